"""flwr's strategies (FedAvg, FedProx, FedAdam), made to report each round.

The strategy is Flower's own; the subclass only notes what the round's replies
said (how many hospitals trained or failed, summed firewall counts) so the run
directory can record it. Failed replies are dropped by flwr's FedAvg and the
round goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from privacy_firewall.config import Config

log = logging.getLogger("skinfed.server")


def _round_summary(replies: list[Message], metric_keys: tuple[str, ...]) -> dict[str, float]:
    ok = [m for m in replies if not m.has_error()]
    out: dict[str, float] = {"clients_trained": len(ok), "clients_failed": len(replies) - len(ok)}
    for key in metric_keys:
        values = [float(m.content["metrics"][key]) for m in ok if key in m.content["metrics"]]
        if values:
            out[key] = sum(values)
    return out


def make_strategy(cfg: Config) -> FedAvg:
    """The configured flwr strategy, recording per-round client summaries in
    ``strategy.train_summary[round]`` and ``strategy.evaluate_summary[round]``."""
    f = cfg.federation
    base, extra = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": f.proximal_mu}),
        "fedadam": (FedAdam, {"eta": f.server_learning_rate}),
    }[f.strategy]

    class Recording(base):  # type: ignore[misc, valid-type]
        train_summary: dict[int, dict[str, float]] = {}
        evaluate_summary: dict[int, dict[str, float]] = {}

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            summary = _round_summary(replies, ("firewall_accepted", "firewall_refused", "num-examples"))
            summary.update({k: float(v) for k, v in (metrics or {}).items() if k == "train_loss"})
            self.train_summary[server_round] = summary
            if summary["clients_failed"]:
                log.warning("round %d: %d hospital(s) failed and were left out of the average",
                            server_round, int(summary["clients_failed"]))
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            replies = list(replies)
            metrics = super().aggregate_evaluate(server_round, replies)
            self.evaluate_summary[server_round] = {k: float(v) for k, v in (metrics or {}).items()}
            return metrics

    strategy = Recording(
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if f.fraction_evaluate > 0 else 0,
        min_available_nodes=f.required_hospitals,
        **extra,
    )
    strategy.train_summary, strategy.evaluate_summary = {}, {}
    return strategy
