"""The hospital's Flower ClientApp.

Each message is answered the same way: compose the run's configuration, make
sure this hospital's photos went through the privacy firewall (once; the cache
makes it free afterwards), then train or score the global U-Net on the
de-identified pairs. Only model arrays and scalar metrics go back: no file
names, paths, ids or pixels.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.hospital import HospitalData, deidentify_hospital, simulation_hospitals
from models import segmentation
from privacy_firewall.config import Config, load_run_config

app = ClientApp()
log = logging.getLogger("skinfed.client")


class NoUsableImages(RuntimeError):
    """This hospital has nothing the firewall could de-identify: it sits the round out."""


class HospitalError(RuntimeError):
    """A failure at the hospital, told to the server without local details."""


def reply_privately(handler):
    """An exception's text can hold local paths or file names; the server gets the
    exception type only, the hospital's own log keeps the details."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except NoUsableImages:
            raise
        except Exception as exc:
            log.exception("%s failed at this hospital", handler.__name__)
            raise HospitalError(f"{handler.__name__} failed at the hospital with {type(exc).__name__} "
                                "(details in the hospital's own log)") from None

    return wrapper


@app.train()
@reply_privately
def train(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    _maybe_fail_for_tests(context, msg)
    hospital = local_hospital(cfg, context)
    if not hospital.train:
        raise NoUsableImages(f"no de-identified images to train on ({hospital.refused} refused by the firewall)")

    model = segmentation.build_model(cfg.model)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"].get("server-round", 0))
    result = segmentation.train(
        model, hospital.train, cfg.model, device=_device(cfg),
        seed=cfg.seed * 1_000_003 + server_round * 1009 + _partition(context),
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord({
        "train_loss": result["train_loss"],
        "num-examples": result["num_examples"],
        "firewall_accepted": hospital.accepted,
        "firewall_refused": hospital.refused,
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
@reply_privately
def evaluate(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    hospital = local_hospital(cfg, context)
    pairs = hospital.validation or hospital.train
    if not pairs:
        raise NoUsableImages("no de-identified images to evaluate on")

    model = segmentation.build_model(cfg.model)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    scores = segmentation.evaluate(model, [p.surrogate for p in pairs], [p.mask for p in pairs], device=_device(cfg))
    metrics = MetricRecord({"dice": scores["dice"], "iou": scores["iou"], "loss": scores["loss"],
                            "num-examples": scores["num_examples"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- helpers
def local_hospital(cfg: Config, context: Context) -> HospitalData:
    """This node's de-identified data: its ``data-path`` in deployment, or its
    share of the synthetic clinic in the simulation."""
    data_path = context.node_config.get("data-path")
    if data_path:
        work_path = context.node_config.get("work-path") or None
        return deidentify_hospital(cfg, str(data_path), work_path)
    num_partitions = int(context.node_config.get("num-partitions", cfg.federation.num_hospitals))
    if num_partitions != cfg.federation.num_hospitals:
        raise RuntimeError(
            f"the simulation has {num_partitions} SuperNodes but federation.num_hospitals="
            f"{cfg.federation.num_hospitals}: launch with `scripts/run_federated.py federation.num_hospitals=N` or pass "
            f"--federation-config 'num-supernodes={cfg.federation.num_hospitals}' to flwr run"
        )
    folders = simulation_hospitals(cfg)
    return deidentify_hospital(cfg, folders[_partition(context)])


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def _device(cfg: Config) -> str:
    if cfg.federation.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.federation.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"federation.device={cfg.federation.device} but this node has no CUDA GPU: use auto or cpu")
    return cfg.federation.device


def _maybe_fail_for_tests(context: Context, msg: Message) -> None:
    """Fault injection for the robustness tests: SKINFED_FAIL_HOSPITAL=<partition id>."""
    target = os.environ.get("SKINFED_FAIL_HOSPITAL")
    if target is not None and target != "" and int(target) == _partition(context):
        raise RuntimeError("injected failure (SKINFED_FAIL_HOSPITAL)")
