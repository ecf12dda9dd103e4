"""The coordinating server's Flower ServerApp.

The story of a run: compose the configuration (once: everything after reads
the typed result), open the run directory (or the one to resume), wait for the
hospitals, and ask each to get its privacy firewall ready — the
de-identification happens here, before round 1, with its own timeout and
progress, never inside a timed round. Then the configured strategy (a named
class of server/strategy.py, FedAvg by default, optionally wrapped in Flower's
differential privacy) runs the rounds, each train message carrying the round's
plan (:mod:`skinfed.round_config`). After each round the server scores the
global model on held-out *original* identities with ground-truth masks, the
paper's question: does a model trained on surrogates work on real patients? It
checkpoints and records the round (which hospitals trained, failed, stopped for
their privacy budget or never answered), and at the end saves the final model
and prints where the results are.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.device import resolve_device
from common.threads import intra_op_threads, use_threads
from models import segmentation
from server.run_directory import RunDirectory
from server.strategy import NotEnoughHospitals, make_strategy
from skinfed.config import RunConfig, load_flower_run_config
from skinfed.data import holdout_set
from skinfed.differential_privacy import (
    DpSettings,
    PrivacyLedger,
    clamp_running_variances,
    dp_train_config,
    without_step_counters,
    wrap_strategy,
)
from skinfed.hospital_replies import PrepareReply
from skinfed.patient_privacy import build_federated_model, is_patient_dp, summary_line, write_run_summary
from skinfed.round_config import train_config

app = ServerApp()
log = logging.getLogger("skinfed.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_flower_run_config(context.run_config)
    # The server scores between rounds, while the hospitals wait: every core of this process.
    use_threads(intra_op_threads())
    torch.manual_seed(cfg.seed)
    hospitals = wait_for_hospitals(grid, cfg)
    cfg = cfg.with_hospitals(len(hospitals))
    run = RunDirectory.create(cfg, context.run_id)
    rounds_left = cfg.federation.num_rounds - run.offset
    say(f"run directory: {run.path}" + (f" (resuming after round {run.offset})" if run.offset else ""))
    prepare_hospitals(grid, hospitals, cfg)

    model = build_federated_model(cfg)  # GroupNorm under patient-level DP, as the hospitals build it
    # Integer step counters (BatchNorm's) are not averaged, clipped or noised.
    start = without_step_counters(run.checkpoint_state() or model.state_dict())
    images, masks = holdout_set(cfg)
    device = resolve_device(cfg.federation.device, "federation.device")  # a missing GPU is an error, not the CPU
    strategy = make_strategy(cfg, cfg.federation.required_hospitals(len(hospitals)))
    dp = dp_settings(cfg, len(hospitals))
    ledger = PrivacyLedger(dp) if dp.enabled and dp.noise_multiplier > 0 else None

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score the global model on original identities, then checkpoint the round."""
        if server_round == 0 and run.offset:
            return None  # the resumed model was scored when it was saved
        state = arrays.to_torch_state_dict()
        clamp_running_variances(state)  # DP noise can make a running variance negative
        model.load_state_dict(state, strict=False)
        scores = segmentation.evaluate(model, images, masks, device=device) if images else {}
        done = run.offset + server_round
        train = dict(strategy.train_summary.get(server_round, {}))
        if ledger is not None and server_round:
            train.update({"dp_epsilon": ledger.record_round(int(train.get("clients_trained") or 0) or None),
                          "dp_delta": dp.delta})
        record = run.record_round(
            done, scores, train,
            strategy.evaluate_summary.get(server_round, {}),
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
        )
        write_run_summary(run.path, run.rounds)  # privacy.json: per-hospital epsilon (patient-level DP)
        say(round_line(record, cfg.federation.num_rounds))
        return MetricRecord({k: float(scores[k]) for k in ("dice", "iou", "loss")}) if scores else None

    final = start
    if rounds_left > 0:
        try:
            result = wrap_strategy(strategy, dp).start(
                grid=grid,
                initial_arrays=ArrayRecord(start),
                num_rounds=rounds_left,
                timeout=cfg.federation.round_timeout,
                train_config=round_plan(cfg, dp, run.path.name),
                evaluate_fn=evaluate_global,
            )
            final = result.arrays.to_torch_state_dict() if len(result.arrays) else start
        except NotEnoughHospitals as exc:
            # The last finished round is checkpointed and the run stays unfinished,
            # so federation.resume=latest picks it up once the hospitals are back.
            say(f"stopped after round {len(run.rounds) - 1}: {exc}")
            say(f"  checkpoint and metrics so far: {run.path}")
            return
    model.load_state_dict(final, strict=False)
    final = model.state_dict()
    if ledger is not None:
        say(f"differential privacy: epsilon {ledger.epsilon:.2f} at delta {dp.delta:g} after {ledger.rounds} rounds "
            f"({dp.mode}, noise multiplier {dp.noise_multiplier})")
    if line := summary_line(write_run_summary(run.path, run.rounds)):
        say(line)
    run.finish(final, cfg)
    if line := dice_line(run.rounds):
        say(line)
    say(f"done: {len(run.rounds) - 1} rounds; results in {run.path}")
    say(f"  metrics: {run.path / 'metrics.json'}  curve: {run.path / 'convergence.png'}")


def round_plan(cfg: RunConfig, dp: DpSettings, run_name: str) -> ConfigRecord:
    """What every train message tells the hospitals (``skinfed.round_config``):
    the round's local epochs, the patient-level DP ledger (the run directory's
    name, kept on resume), and what Flower's clipping mods need under DP."""
    plan = train_config(cfg.model.local_epochs, dp_run=run_name if is_patient_dp(cfg) else None)
    plan.update(dp_train_config(dp))
    return plan


def dp_settings(cfg: RunConfig, hospitals: int) -> DpSettings:
    """Flower's DP settings for ``federation.dp`` with every connected hospital
    sampled each round. Adaptive clipping's noise on the clipped count must exceed
    half the noise multiplier (Flower's check): it is set equal to it."""
    dp = cfg.federation.dp
    extra = {"clipped_count_stddev": max(dp.noise_multiplier, hospitals / 20)} if dp.mode.endswith("adaptive") else {}
    return DpSettings.from_config(dp, num_sampled_clients=hospitals, population_size=hospitals, **extra)


def wait_for_hospitals(grid: Grid, cfg: RunConfig) -> list[int]:
    """The connected hospitals' node ids, after waiting at most
    ``federation.connect_timeout`` for all of them (``federation.num_hospitals``,
    or until the count stops growing when it is null); says what to do if too few."""
    want = cfg.federation.num_hospitals
    deadline = time.time() + cfg.federation.connect_timeout
    nodes = sorted(grid.get_node_ids())
    settled_since = time.time()
    while time.time() < deadline:
        if want is not None and len(nodes) >= want:
            break
        if want is None and nodes and time.time() - settled_since > 3.0:
            break  # the simulation registers its SuperNodes together
        time.sleep(0.5)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, settled_since = now, time.time()
    need = cfg.federation.required_hospitals(len(nodes)) if want is None else cfg.federation.required_hospitals(want)
    if len(nodes) < max(need, 1):
        raise RuntimeError(
            f"{len(nodes)} hospital(s) connected after {cfg.federation.connect_timeout:.0f} s, {need} needed "
            f"(federation.min_available_hospitals={cfg.federation.min_available_hospitals}). In a deployment, start "
            "the missing SuperNodes, raise federation.connect_timeout, or lower federation.min_available_hospitals; "
            "in the simulation, the number of SuperNodes is `flwr run . --federation-config 'num-supernodes=N'`."
        )
    if want is not None and len(nodes) != want:
        log.warning("%d of federation.num_hospitals=%d hospitals connected: going on with them", len(nodes), want)
    say(f"{len(nodes)} hospital(s) connected")
    return nodes


def prepare_hospitals(grid: Grid, hospitals: list[int], cfg: RunConfig) -> None:
    """Ask every hospital to get its firewall ready before round 1, and show what
    each said (counts only). A hospital that fails or is not ready is reported
    and sits rounds out until it is; the federation goes on."""
    say(f"privacy firewall: de-identifying at {len(hospitals)} hospital(s) "
        f"(at most {cfg.federation.prepare_timeout:.0f} s)...")
    t0 = time.time()
    # The query message is the request itself (the ClientApp's one query handler): no keys to read.
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                        message_type="query") for node in hospitals]
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.prepare_timeout))
    answered = {m.metadata.src_node_id: m for m in replies}
    ready = 0
    for node in hospitals:
        reply = answered.get(node)
        if reply is None:
            say(f"  hospital {node}: no answer within federation.prepare_timeout")
        elif reply.has_error():
            say(f"  hospital {node}: failed ({reply.error.reason.splitlines()[0][:200]})")
        else:
            m = PrepareReply.from_record(reply.content["metrics"])
            ready += int(m.ready)
            state = "ready" if m.ready else f"not ready ({m.done} of {m.total} photos done)"
            say(f"  hospital {node}: {state}, {m.accepted} photos de-identified, {m.refused} refused")
    say(f"privacy firewall: {ready} of {len(hospitals)} hospital(s) ready after {time.time() - t0:.0f} s")


def round_line(record: dict, total: int) -> str:
    def fmt(key: str) -> str:
        v = record.get(key)
        return "-" if v is None else f"{v:.3f}"

    # Flower's hospital-level epsilon, or the largest patient-level epsilon over the hospitals.
    value = record.get("dp_epsilon", record.get("epsilon"))
    epsilon = f" | epsilon {value:.2f}" if value is not None else ""
    stopped = [str(entry["id"]) for entry in record.get("hospitals_dp_budget_spent") or []]
    budget = f" ({len(stopped)} over their privacy budget: {', '.join(stopped)})" if stopped else ""
    return (f"round {record['round']}/{total}: global Dice {fmt('global_dice')} IoU {fmt('global_iou')} "
            f"(original identities) | client Dice {fmt('client_dice')} | train loss {fmt('train_loss')} | "
            f"hospitals {record.get('clients_trained') or 0} ok, {record.get('clients_failed') or 0} failed{budget}"
            f"{epsilon} | {record.get('seconds', 0):.0f} s")


def dice_line(rounds: list[dict]) -> str | None:
    """The global Dice of the final round and of the best round (one run's rounds
    swing: the final one is what the run hands over, the best one what it reached)."""
    scored = [(r["round"], r["global_dice"]) for r in rounds if r.get("round", 0) > 0 and r.get("global_dice") is not None]
    if not scored:
        return None
    best_round, best = max(scored, key=lambda rd: rd[1])
    final_round, final = scored[-1]
    return f"global Dice: final {final:.3f} (round {final_round}), best {best:.3f} (round {best_round})"


def say(text: str) -> None:
    """Progress for the person watching (`flwr run --stream` shows the ServerApp's log)."""
    log.info(text)
    print(text, flush=True)
