"""The coordinating server's Flower ServerApp.

The story of a run: compose the configuration, open the run directory (or the
one to resume), check that every hospital is connected, then let flwr's strategy
(FedAvg by default) run the rounds. After each round the server scores the
global model on held-out *original* identities with ground-truth masks, the
paper's question: does a model trained on surrogates work on real patients? It
checkpoints and records the round, and at the end saves the final model and
prints where the results are.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from client.hospital import holdout_set
from models import segmentation
from privacy_firewall.config import Config, load_run_config
from server.run_directory import RunDirectory
from server.strategy import make_strategy

app = ServerApp()
log = logging.getLogger("skinfed.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_run_config(context.run_config)
    torch.manual_seed(cfg.seed)
    run = RunDirectory.create(cfg, context.run_id)
    rounds_left = cfg.federation.num_rounds - run.offset
    say(f"run directory: {run.path}" + (f" (resuming after round {run.offset})" if run.offset else ""))
    wait_for_hospitals(grid, cfg)

    model = segmentation.build_model(cfg.model)
    start = run.checkpoint_state() or model.state_dict()
    images, masks = holdout_set(cfg)
    device = "cuda" if cfg.federation.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    strategy = make_strategy(cfg)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score the global model on original identities, then checkpoint the round."""
        if server_round == 0 and run.offset:
            return None  # the resumed model was scored when it was saved
        model.load_state_dict(arrays.to_torch_state_dict())
        scores = segmentation.evaluate(model, images, masks, device=device) if images else {}
        done = run.offset + server_round
        record = run.record_round(
            done, scores, strategy.train_summary.get(server_round, {}), strategy.evaluate_summary.get(server_round, {}),
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
        )
        say(round_line(record, cfg.federation.num_rounds))
        return MetricRecord({k: float(scores[k]) for k in ("dice", "iou", "loss")}) if scores else None

    if rounds_left > 0:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(start),
            num_rounds=rounds_left,
            timeout=cfg.federation.round_timeout,
            train_config=ConfigRecord({"local-epochs": cfg.model.local_epochs}),
            evaluate_fn=evaluate_global,
        )
        final = result.arrays.to_torch_state_dict() if len(result.arrays) else start
    else:
        final = start
    run.finish(final, cfg)
    say(f"done: {len(run.rounds) - 1} rounds; results in {run.path}")
    say(f"  metrics: {run.path / 'metrics.json'}  curve: {run.path / 'convergence.png'}")


def wait_for_hospitals(grid: Grid, cfg: Config) -> None:
    """Wait until the required hospitals are connected; say what to do if not."""
    want, need = cfg.federation.num_hospitals, cfg.federation.required_hospitals
    deadline = time.time() + cfg.federation.connect_timeout
    while len(list(grid.get_node_ids())) < want and time.time() < deadline:
        time.sleep(0.5)
    have = len(list(grid.get_node_ids()))
    if have < need:
        raise RuntimeError(
            f"{have} hospital(s) connected after {cfg.federation.connect_timeout:.0f} s, {need} needed "
            f"(federation.num_hospitals={want}). In the simulation the number of SuperNodes must match: use "
            f"`skinfed-run federation.num_hospitals={want}` or `flwr run . --stream --federation-config "
            f"'num-supernodes={want}'`. In a deployment, start the missing SuperNodes, raise "
            "federation.connect_timeout, or lower federation.min_available_hospitals."
        )
    if have != want:
        log.warning("%d hospitals connected, federation.num_hospitals=%d", have, want)


def round_line(record: dict, total: int) -> str:
    def fmt(key: str) -> str:
        v = record.get(key)
        return "-" if v is None else f"{v:.3f}"

    return (f"round {record['round']}/{total}: global Dice {fmt('global_dice')} IoU {fmt('global_iou')} "
            f"(original identities) | client Dice {fmt('client_dice')} | train loss {fmt('train_loss')} | "
            f"hospitals {record.get('clients_trained') or '-'} ok, {record.get('clients_failed') or 0} failed | "
            f"{record['seconds']:.0f} s")


def say(text: str) -> None:
    """Progress for the person watching (`flwr run --stream` shows the ServerApp's log)."""
    log.info(text)
    print(text, flush=True)
