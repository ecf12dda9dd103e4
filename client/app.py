"""The hospital's Flower ClientApp.

A hospital answers three kinds of message, each the same way: take the run's
configuration (composed once per run) and the cores this process really has,
find this hospital's de-identified pairs, and answer with model arrays and
scalar metrics only — no file names, paths, ids or pixels. The metrics are the
typed replies of :mod:`skinfed.hospital_replies`; what a round asks for (its
epochs, FedProx's mu, the privacy ledger) comes in the message and is read
through :class:`skinfed.round_config.TrainRound`.

* ``query`` (before round 1): run the privacy firewall on the hospital's photos
  (simulation) or report how far the firewall service got (deployment);
* ``train``: train the global U-Net on (surrogate, mask) pairs;
* ``evaluate``: score it on the hospital's validation surrogates.

A hospital whose firewall is not ready answers at once with ``ready=0`` and
``done`` of ``total`` photos instead of a model; under patient-level DP a
hospital whose next round would pass its epsilon budget answers with
``budget_spent=1`` and its epsilon instead. Either sits the round out, and the
server records it.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.hospital import (
    FirewallNotReady,
    HospitalData,
    load_hospital,
    load_published,
    node_dir,
    prepare_hospital,
    training_seed,
)
from common.device import resolve_device
from common.threads import intra_op_threads, use_threads
from models import segmentation
from skinfed.config import RunConfig, load_flower_run_config
from skinfed.data import simulation_hospitals
from skinfed.differential_privacy import dp_train_mod, without_step_counters
from skinfed.hospital_replies import BudgetSpent, EvaluateReply, NotReady, PrepareReply, TrainReply
from skinfed.patient_privacy import PrivacyBudgetSpent, build_federated_model, is_patient_dp
from skinfed.patient_privacy import train_round as train_with_patient_dp
from skinfed.round_config import TrainRound

app = ClientApp()
log = logging.getLogger("skinfed.client")


class NoUsableImages(RuntimeError):
    """This hospital has nothing the firewall could de-identify: it sits the round out."""


class HospitalError(RuntimeError):
    """A failure at the hospital, told to the server without local details."""


def reply_privately(handler):
    """An exception's text can hold local paths or file names; the server gets the
    exception type only (and the not-ready counts), the hospital's own log keeps
    the details."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (NoUsableImages, FirewallNotReady):
            raise
        except Exception as exc:
            log.exception("%s failed at this hospital", handler.__name__)
            raise HospitalError(f"{handler.__name__} failed at the hospital with {type(exc).__name__} "
                                "(details in the hospital's own log)") from None

    return wrapper


def sits_out_when_not_ready(handler):
    """A hospital whose firewall has not published its pairs yet answers with how
    far it is, and no model (:func:`not_ready_reply`)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FirewallNotReady as exc:
            return not_ready_reply(msg, exc)

    return wrapper


@app.query()
@reply_privately
def prepare(msg: Message, context: Context) -> Message:
    """Before round 1: de-identify this hospital's photos (simulation), or say how
    far the firewall service is (deployment)."""
    cfg = run_config(context)
    use_available_cores(context)  # the firewall's model runs in this process too
    published = context.node_config.get("deidentified-path")
    if published:
        try:
            hospital = load_published(cfg, str(published))
            done = hospital.accepted + hospital.refused
            reply = PrepareReply(ready=1, done=done, total=done, accepted=hospital.accepted, refused=hospital.refused)
        except FirewallNotReady as exc:
            log.info("%s", exc)
            reply = PrepareReply(ready=0, done=exc.status.done, total=exc.status.total, accepted=0, refused=0)
    else:
        data_dir, work_dir = hospital_folder(cfg, context)
        cohort = prepare_hospital(cfg, data_dir, work_dir, progress=True)
        reply = PrepareReply(ready=1, done=cohort["images"], total=cohort["images"], accepted=cohort["ok"],
                             refused=cohort["failed"])
    return Message(RecordDict({"metrics": reply.to_record()}), reply_to=msg)


@app.train(mods=[dp_train_mod])  # Flower's clipping mod when the server runs DP (federation.dp)
@reply_privately
@sits_out_when_not_ready
def train(msg: Message, context: Context) -> Message:
    cfg = run_config(context)
    use_available_cores(context)
    hospital = local_hospital(cfg, context)
    if not hospital.train:
        raise NoUsableImages(f"no de-identified images to train on ({hospital.refused} refused by the firewall)")

    plan = TrainRound.from_record(msg.content["config"])  # the round as the server planned it
    model = build_federated_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)  # no step counters
    node = node_folder(cfg, context)
    seed = training_seed(node, plan.server_round)
    if is_patient_dp(cfg):  # DP-SGD, accounted in this hospital's private ledger
        try:
            result = train_with_patient_dp(model, hospital.train, cfg, node, plan.dp_run, epochs=plan.local_epochs,
                                           seed=seed, device=device_for(cfg))
        except PrivacyBudgetSpent as spent:
            return budget_spent_reply(msg, spent)
    else:
        result = segmentation.train(model, hospital.train, cfg.model, epochs=plan.local_epochs,
                                    device=device_for(cfg), seed=seed, proximal_mu=plan.proximal_mu)
    metrics = TrainReply(train_loss=result["train_loss"], num_examples=result["num_examples"],
                         firewall_accepted=hospital.accepted, firewall_refused=hospital.refused).to_record()
    metrics.update(result.get("metrics", {}))
    arrays = ArrayRecord(without_step_counters(model.state_dict()))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
@reply_privately
@sits_out_when_not_ready
def evaluate(msg: Message, context: Context) -> Message:
    cfg = run_config(context)
    use_available_cores(context)
    hospital = local_hospital(cfg, context)
    pairs = hospital.validation or hospital.train
    if not pairs:
        raise NoUsableImages("no de-identified images to evaluate on")

    model = build_federated_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
    scores = segmentation.evaluate(model, [p.surrogate for p in pairs], [p.mask for p in pairs], device=device_for(cfg))
    metrics = EvaluateReply(dice=scores["dice"], iou=scores["iou"], loss=scores["loss"],
                            num_examples=scores["num_examples"]).to_record()
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- helpers
#: The composed configuration of the runs this process serves, by run (its id and
#: overrides): Hydra composes once per run, not on every message. Bounded: a
#: long-lived SuperNode serves many runs.
_RUN_CONFIGS: dict[tuple[int, str, str], RunConfig] = {}
_RUNS_KEPT = 4


def run_config(context: Context) -> RunConfig:
    """The run's configuration (``skinfed.config.load_flower_run_config``), composed
    the first time a message of this run arrives."""
    key = (int(context.run_id), os.environ.get("SKINFED_OVERRIDES", ""), str(context.run_config.get("overrides", "")))
    cfg = _RUN_CONFIGS.get(key)
    if cfg is None:
        cfg = load_flower_run_config(context.run_config)
        while len(_RUN_CONFIGS) >= _RUNS_KEPT:
            _RUN_CONFIGS.pop(next(iter(_RUN_CONFIGS)))
        _RUN_CONFIGS[key] = cfg
    return cfg


def use_available_cores(context: Context) -> int:
    """torch's threads from the cores this process really has
    (:func:`common.threads.intra_op_threads`); returns the count."""
    return use_threads(intra_op_threads(hospitals_on_this_machine(context)))


def hospitals_on_this_machine(context: Context) -> int:
    """The simulation's hospitals share one machine (Flower's ``num-partitions``,
    each a Ray actor with its reserved CPUs); a deployed SuperNode (``data-path``
    or ``deidentified-path``) is one hospital on its own cores."""
    if context.node_config.get("data-path") or context.node_config.get("deidentified-path"):
        return 1
    return max(1, int(context.node_config.get("num-partitions", 1)))


def not_ready_reply(msg: Message, exc: FirewallNotReady) -> Message:
    """This hospital sits the round out: how far its firewall is, and no model."""
    log.info("%s", exc)
    return Message(RecordDict({"metrics": NotReady.of(exc.status.done, exc.status.total).to_record()}), reply_to=msg)


def budget_spent_reply(msg: Message, spent: PrivacyBudgetSpent) -> Message:
    """This hospital trains no more in this run: its epsilon and budget, and no model
    (the reason's text stays in the hospital's log)."""
    return Message(RecordDict({"metrics": BudgetSpent.of(spent.epsilon, spent.budget).to_record()}), reply_to=msg)


def local_hospital(cfg: RunConfig, context: Context) -> HospitalData:
    """This node's de-identified pairs: the firewall service's newest snapshot in
    deployment (node config ``deidentified-path``), the firewall's output in the
    simulation."""
    published = context.node_config.get("deidentified-path")
    if published:
        return load_published(cfg, str(published))
    data_dir, work_dir = hospital_folder(cfg, context)
    return load_hospital(cfg, data_dir, work_dir)


def hospital_folder(cfg: RunConfig, context: Context) -> tuple[str, str | None]:
    """(photos, node work folder): the node's ``data-path`` (and ``work-path``) in a
    deployment that runs the firewall in the ClientApp, or its share of the
    simulation's hospitals (Flower's ``partition-id`` of ``num-partitions``)."""
    data_path = context.node_config.get("data-path")
    if data_path:
        return str(data_path), (str(context.node_config.get("work-path") or "") or None)
    num_partitions = int(context.node_config.get("num-partitions", 1))
    if cfg.federation.num_hospitals is not None and num_partitions != cfg.federation.num_hospitals:
        raise RuntimeError(
            f"the simulation has {num_partitions} SuperNodes but federation.num_hospitals="
            f"{cfg.federation.num_hospitals}: leave federation.num_hospitals=null (one hospital per SuperNode) or run "
            f"`flwr run . --federation-config 'num-supernodes={cfg.federation.num_hospitals}'`"
        )
    folders = simulation_hospitals(cfg, num_partitions)
    return str(folders[int(context.node_config.get("partition-id", 0))]), None


def node_folder(cfg: RunConfig, context: Context) -> Path:
    """This node's private folder (firewall output, secret keys): its ``work-path``,
    else one under ``paths.home`` named by its data."""
    work_path = str(context.node_config.get("work-path") or "")
    if context.node_config.get("deidentified-path"):
        return Path(work_path) if work_path else Path(cfg.paths.home).expanduser() / "node"
    data_dir, work_dir = hospital_folder(cfg, context)
    return node_dir(cfg, data_dir, work_dir)


def device_for(cfg: RunConfig) -> str:
    """``federation.device`` on this node (a missing GPU is an error, never the CPU)."""
    return str(resolve_device(cfg.federation.device, "federation.device"))
