"""flwr's strategies (FedAvg, FedProx, FedAdam), made to report each round and to
survive lost hospitals.

The strategy is Flower's own; the subclass adds three things:

* accounting: it remembers which hospitals (node ids) each round's messages were
  sent to, and sorts them by what came back: ``trained`` (a reply with a model),
  ``failed`` (the ClientApp raised), ``not_ready`` (the hospital's firewall has
  not finished: a reply whose metrics say ``ready=0``, ``done`` of ``total``
  photos, :class:`skinfed.hospital_replies.NotReady`) and ``missed`` (no reply before
  the round timeout, or the SuperLink reported the node gone). Everything but
  ``trained`` counts as failed; flwr's FedAvg leaves those out of the average and
  the round goes on;
* a bounded wait for hospitals: flwr waits for ``min_available_nodes`` forever
  (printing "Waiting for nodes to connect" once a second); here each round waits
  at most ``node_wait_seconds`` and then stops the run with a clear message
  (:class:`NotEnoughHospitals`). A hospital that comes back is sampled again in
  the next round;
* counts summed over the hospitals, not averaged (the fields of
  :mod:`skinfed.hospital_replies` marked as counts), other metrics averaged by weight.

Only node ids and numbers are recorded: no names, paths or reasons from hospitals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from skinfed import patient_privacy
from skinfed.hospital_replies import SUMMED_KEYS, progress_if_not_ready

log = logging.getLogger("skinfed.server")

#: flwr's error codes for replies that the SuperLink made because none came
#: (flwr.common.constant.ErrorCode): message expired, reply expired, node gone.
NO_REPLY_CODES = frozenset({3, 4, 5})


class NotEnoughHospitals(RuntimeError):
    """Fewer hospitals connected than a round requires, after the bounded wait."""


@dataclass
class RoundOutcome:
    """Which hospitals (node ids) a round's messages went to and what came back."""

    sent: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # the ClientApp raised
    not_ready: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (done, total)
    missed: list[int] = field(default_factory=list)  # no reply at all

    def summary(self) -> dict:
        return {
            "clients_trained": len(self.trained),
            "clients_failed": len(self.failed) + len(self.not_ready) + len(self.missed),
            "clients_missed": len(self.missed),
            "clients_not_ready": len(self.not_ready),
            "hospitals_trained": sorted(self.trained),
            "hospitals_failed": sorted(self.failed),
            "hospitals_missed": sorted(self.missed),
            "hospitals_not_ready": [{"id": node, "done": d, "total": t} for node, (d, t) in sorted(self.not_ready.items())],
        }


def classify_replies(sent: dict[str, int], replies: list[Message]) -> RoundOutcome:
    """Sort a round by node: ``sent`` maps each sent message's id to its node id.

    A reply made by the SuperLink (a node that stopped sending heartbeats, an
    expired message) names our message, not the node, so the node is looked up
    through ``sent``; a ClientApp's reply (or error) comes from its node."""
    out = RoundOutcome(sent=sorted(set(sent.values())))
    answered: set[int] = set()
    for reply in replies:
        meta = reply.metadata
        node = sent.get(meta.reply_to_message_id, meta.src_node_id)
        if node not in sent.values():
            out.sent.append(node)  # accounting without configure_train (tests): learn from the reply
        answered.add(node)
        if not reply.has_error():
            progress = _not_ready(reply)
            if progress is None:
                out.trained.append(node)
            else:
                out.not_ready[node] = progress
        elif int(reply.error.code) in NO_REPLY_CODES:
            out.missed.append(node)
        else:
            out.failed.append(node)
    out.missed += [node for node in out.sent if node not in answered]
    out.sent = sorted(set(out.sent))
    return out


def _not_ready(reply: Message) -> tuple[int, int] | None:
    records = list(reply.content.metric_records.values())
    return progress_if_not_ready(records[0]) if len(records) == 1 else None


def _with_a_model(replies: list[Message]) -> list[Message]:
    """The replies flwr's aggregation may see: errors (which it counts) and models,
    not the answers of hospitals that are not ready (they carry no model)."""
    return [m for m in replies if m.has_error() or _not_ready(m) is None]


def combine_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The hospitals' metrics in one record: counts (``skinfed.hospital_replies.SUMMED_KEYS``)
    summed, everything else averaged weighted by ``weighted_by_key`` (flwr's
    ``train_metrics_aggr_fn``/``evaluate_metrics_aggr_fn``)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighted_by_key]) for m in metrics]
    total = sum(weights) or 1.0
    out = MetricRecord()
    for key in dict.fromkeys(k for m in metrics for k in m.keys()):
        values = [(m[key], w) for m, w in zip(metrics, weights) if key in m and not isinstance(m[key], list)]
        if not values:
            continue
        if key in SUMMED_KEYS:
            out[key] = sum(v for v, _ in values)
        else:
            out[key] = float(sum(float(v) * w for v, w in values) / total)
    return out


def recording_strategy(base: type[FedAvg], *, node_wait_seconds: float, **kwargs) -> FedAvg:
    """An instance of ``base`` (FedAvg or a subclass) with the accounting and the
    bounded wait described above; ``kwargs`` go to ``base``. Per-round summaries
    land in ``strategy.train_summary[round]`` and ``strategy.evaluate_summary[round]``."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, **inner) -> None:
            super().__init__(**inner)
            self.node_wait_seconds = float(node_wait_seconds)
            self.train_summary: dict[int, dict] = {}
            self.evaluate_summary: dict[int, dict] = {}
            self._sent: dict[tuple[str, int], list[Message]] = {}

        # -- a bounded wait instead of flwr's endless one ----------------------------------
        def _wait_for_hospitals(self, grid: Grid, phase: str, server_round: int) -> int:
            need = self.min_available_nodes
            deadline = time.monotonic() + self.node_wait_seconds
            said = False
            while (have := len(list(grid.get_node_ids()))) < need and time.monotonic() < deadline:
                if not said:
                    log.warning("round %d (%s): %d of the %d hospitals a round requires are connected; waiting up "
                                "to %.0f s", server_round, phase, have, need, self.node_wait_seconds)
                    said = True
                time.sleep(1.0)
            if have < need:
                raise NotEnoughHospitals(
                    f"round {server_round} ({phase}): {have} hospital(s) connected after waiting "
                    f"{self.node_wait_seconds:.0f} s, {need} required per round. Start the missing SuperNodes and "
                    "resume the run (federation.resume=latest), or lower federation.min_available_hospitals.")
            return have

        def _configure(self, phase: str, server_round: int, grid: Grid, configure) -> list[Message]:
            have = self._wait_for_hospitals(grid, phase, server_round)
            need = self.min_available_nodes
            # flwr's sample_nodes waits again; a hospital lost since the check must not make that endless.
            self.min_available_nodes = min(need, max(have, 1))
            try:
                messages = list(configure())
            finally:
                self.min_available_nodes = need
            self._sent[(phase, server_round)] = messages  # flwr's grid sets their message ids when pushing
            return messages

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            return self._configure("train", server_round, grid,
                                   lambda: super(Recording, self).configure_train(server_round, arrays, config, grid))

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                               grid: Grid) -> Iterable[Message]:
            return self._configure("evaluate", server_round, grid,
                                   lambda: super(Recording, self).configure_evaluate(server_round, arrays, config, grid))

        def _outcome(self, phase: str, server_round: int, replies: list[Message]) -> RoundOutcome:
            sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.pop((phase, server_round), [])
                    if m.metadata.message_id}
            return classify_replies(sent, replies)

        # -- accounting ------------------------------------------------------------------------
        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, _with_a_model(replies))
            outcome = self._outcome("train", server_round, replies)
            summary = {**outcome.summary(), **{k: float(v) for k, v in (metrics or {}).items()
                                               if k in SUMMED_KEYS or k == "train_loss"}}
            summary.update(patient_privacy.round_summary(replies))  # epsilon per hospital (patient-level DP)
            self.train_summary[server_round] = summary
            if summary["clients_failed"]:
                log.warning(
                    "round %d: %d of %d hospital(s) left out of the average: failed %s, not ready %s, no reply %s",
                    server_round, summary["clients_failed"], len(outcome.sent), outcome.failed or "-",
                    {n: f"{d} of {t} photos done" for n, (d, t) in outcome.not_ready.items()} or "-",
                    outcome.missed or "-")
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            replies = list(replies)
            metrics = super().aggregate_evaluate(server_round, _with_a_model(replies))
            outcome = self._outcome("evaluate", server_round, replies)
            self.evaluate_summary[server_round] = {
                **{k: float(v) for k, v in (metrics or {}).items()},
                "clients_evaluated": len(outcome.trained),
            }
            return metrics

    kwargs.setdefault("train_metrics_aggr_fn", combine_metrics)
    kwargs.setdefault("evaluate_metrics_aggr_fn", combine_metrics)
    return Recording(**kwargs)


def make_strategy(cfg, required_hospitals: int, node_wait_seconds: float | None = None) -> FedAvg:
    """The configured flwr strategy (``cfg.federation``), waiting at most
    ``node_wait_seconds`` (default ``federation.connect_timeout``) per round for
    ``required_hospitals`` hospitals (``federation.required_hospitals(connected)``)."""
    f = cfg.federation
    base, extra = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": f.proximal_mu}),
        "fedadam": (FedAdam, {"eta": f.server_learning_rate}),
    }[f.strategy]
    return recording_strategy(
        base,
        node_wait_seconds=f.connect_timeout if node_wait_seconds is None else node_wait_seconds,
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if f.fraction_evaluate > 0 else 0,
        min_available_nodes=required_hospitals,
        **extra,
    )
