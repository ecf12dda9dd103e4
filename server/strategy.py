"""The server's strategies: flwr's FedAvg, FedProx and FedAdam, each a named class
with its own settings, made to report each round and to survive lost hospitals.

Each strategy is registered under its name (``federation.strategy``) and built
from its typed settings (``federation.strategies.<name>``,
:mod:`skinfed.config`): :class:`SkinFedAvg`, :class:`SkinFedProx`,
:class:`SkinFedAdam`. The algorithm is Flower's own; :class:`RoundAccounting`,
mixed into each, adds three things:

* accounting: it remembers which hospitals (node ids) each round's messages were
  sent to, and sorts them by what came back: ``trained`` (a reply with a model),
  ``failed`` (the ClientApp raised), ``not_ready`` (the hospital's firewall has
  not finished: a reply whose metrics say ``ready=0``, ``done`` of ``total``
  photos, :class:`skinfed.hospital_replies.NotReady`), ``over_budget`` (under
  patient-level DP the hospital's next round would pass its epsilon budget: a
  reply whose metrics say ``budget_spent=1``, :class:`skinfed.hospital_replies.BudgetSpent`)
  and ``missed`` (no reply before the round timeout, or the SuperLink reported
  the node gone). Everything but ``trained`` counts as failed; flwr's FedAvg
  leaves those out of the average and the round goes on;
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import ConfigError
from skinfed import patient_privacy
from skinfed.config import FedAdamSettings, FedAvgSettings, FedProxSettings, RunConfig, StrategySettings
from skinfed.hospital_replies import SUMMED_KEYS, budget_if_spent, progress_if_not_ready

log = logging.getLogger("skinfed.server")

#: flwr's error codes for replies that the SuperLink made because none came
#: (flwr.common.constant.ErrorCode): message expired, reply expired, node gone.
NO_REPLY_CODES = frozenset({3, 4, 5})


class NotEnoughHospitals(RuntimeError):
    """Fewer hospitals connected than a round requires, after the bounded wait."""


# ----------------------------------------------------------------------------- the accounting
@dataclass
class RoundOutcome:
    """Which hospitals (node ids) a round's messages went to and what came back."""

    sent: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # the ClientApp raised
    not_ready: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (done, total)
    over_budget: dict[int, tuple[float, float]] = field(default_factory=dict)  # node -> (epsilon, budget)
    missed: list[int] = field(default_factory=list)  # no reply at all

    def summary(self) -> dict[str, Any]:
        return {
            "clients_trained": len(self.trained),
            "clients_failed": len(self.failed) + len(self.not_ready) + len(self.over_budget) + len(self.missed),
            "clients_missed": len(self.missed),
            "clients_not_ready": len(self.not_ready),
            "clients_over_budget": len(self.over_budget),
            "hospitals_trained": sorted(self.trained),
            "hospitals_failed": sorted(self.failed),
            "hospitals_missed": sorted(self.missed),
            "hospitals_not_ready": [{"id": node, "done": d, "total": t} for node, (d, t) in sorted(self.not_ready.items())],
            # The run directory's name for it (metrics.json, privacy.json).
            "hospitals_dp_budget_spent": [{"id": node, "epsilon": e, "epsilon_budget": b}
                                          for node, (e, b) in sorted(self.over_budget.items())],
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
        if reply.has_error():
            (out.missed if int(reply.error.code) in NO_REPLY_CODES else out.failed).append(node)
        elif (progress := _not_ready(reply)) is not None:
            out.not_ready[node] = progress
        elif (spent := _budget_spent(reply)) is not None:
            out.over_budget[node] = spent
        else:
            out.trained.append(node)
    out.missed += [node for node in out.sent if node not in answered]
    out.sent = sorted(set(out.sent))
    return out


def _metrics(reply: Message) -> Any:
    records = list(reply.content.metric_records.values())
    return records[0] if len(records) == 1 else None


def _not_ready(reply: Message) -> tuple[int, int] | None:
    metrics = _metrics(reply)
    return None if metrics is None else progress_if_not_ready(metrics)


def _budget_spent(reply: Message) -> tuple[float, float] | None:
    metrics = _metrics(reply)
    spent = None if metrics is None else budget_if_spent(metrics)
    return None if spent is None else (spent.epsilon, spent.epsilon_budget)


def _with_a_model(replies: list[Message]) -> list[Message]:
    """The replies flwr's aggregation may see: errors (which it counts) and models,
    not the answers of hospitals that sat the round out (they carry no model)."""
    return [m for m in replies if m.has_error() or (_not_ready(m) is None and _budget_spent(m) is None)]


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


class RoundAccounting:
    """What every strategy of the project adds to flwr's (see the module's
    docstring); mixed in before the flwr class: ``class SkinFedX(RoundAccounting, FedX)``.
    Per-round summaries land in ``train_summary[round]`` and ``evaluate_summary[round]``."""

    #: The settings type this strategy is built from (its name is ``federation.strategy``).
    settings_type: ClassVar[type]
    min_available_nodes: int

    def __init__(self, *, node_wait_seconds: float, **flwr_settings: Any) -> None:
        flwr_settings.setdefault("train_metrics_aggr_fn", combine_metrics)
        flwr_settings.setdefault("evaluate_metrics_aggr_fn", combine_metrics)
        super().__init__(**flwr_settings)
        self.node_wait_seconds = float(node_wait_seconds)
        self.train_summary: dict[int, dict[str, Any]] = {}
        self.evaluate_summary: dict[int, dict[str, Any]] = {}
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

    def _configure(self, phase: str, server_round: int, grid: Grid,
                   configure: Callable[[], Iterable[Message]]) -> list[Message]:
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
                               lambda: super(RoundAccounting, self).configure_train(  # type: ignore[misc]
                                   server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._configure("evaluate", server_round, grid,
                               lambda: super(RoundAccounting, self).configure_evaluate(  # type: ignore[misc]
                                   server_round, arrays, config, grid))

    def _outcome(self, phase: str, server_round: int, replies: list[Message]) -> RoundOutcome:
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.pop((phase, server_round), [])
                if m.metadata.message_id}
        return classify_replies(sent, replies)

    # -- accounting ------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, _with_a_model(replies))  # type: ignore[misc]
        outcome = self._outcome("train", server_round, replies)
        summary = {**outcome.summary(), **{k: float(v) for k, v in (metrics or {}).items()
                                           if k in SUMMED_KEYS or k == "train_loss"}}
        summary.update(patient_privacy.round_summary(replies))  # epsilon per hospital (patient-level DP)
        self.train_summary[server_round] = summary
        if summary["clients_failed"]:
            log.warning(
                "round %d: %d of %d hospital(s) left out of the average: failed %s, not ready %s, over their "
                "privacy budget %s, no reply %s",
                server_round, summary["clients_failed"], len(outcome.sent), outcome.failed or "-",
                {n: f"{d} of {t} photos done" for n, (d, t) in outcome.not_ready.items()} or "-",
                {n: f"epsilon {e:.3g} of {b:.3g}" for n, (e, b) in outcome.over_budget.items()} or "-",
                outcome.missed or "-")
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, _with_a_model(replies))  # type: ignore[misc]
        outcome = self._outcome("evaluate", server_round, replies)
        self.evaluate_summary[server_round] = {
            **{k: float(v) for k, v in (metrics or {}).items()},
            "clients_evaluated": len(outcome.trained),
        }
        return metrics


# ----------------------------------------------------------------------------- the strategies
#: The strategy classes by name (``federation.strategy``), one per registered settings type.
STRATEGIES: dict[str, type[RoundAccounting]] = {}
_Strategy = TypeVar("_Strategy", bound=type[RoundAccounting])


def registered(cls: _Strategy) -> _Strategy:
    """Register a strategy class under its settings' name."""
    STRATEGIES[cls.settings_type.name] = cls
    return cls


@registered
class SkinFedAvg(RoundAccounting, FedAvg):
    """FedAvg: the average of the hospitals' models, weighted by their training pairs."""

    settings_type = FedAvgSettings

    def __init__(self, settings: FedAvgSettings, **common: Any) -> None:
        super().__init__(**common)


@registered
class SkinFedProx(RoundAccounting, FedProx):
    """FedProx: flwr sends ``proximal-mu`` with every train message
    (``skinfed.round_config.PROXIMAL_MU``) and each hospital adds the proximal term."""

    settings_type = FedProxSettings

    def __init__(self, settings: FedProxSettings, **common: Any) -> None:
        super().__init__(proximal_mu=settings.proximal_mu, **common)


@registered
class SkinFedAdam(RoundAccounting, FedAdam):
    """FedAdam: Adam on the server over the hospitals' average update."""

    settings_type = FedAdamSettings

    def __init__(self, settings: FedAdamSettings, **common: Any) -> None:
        super().__init__(eta=settings.eta, beta_1=settings.beta_1, beta_2=settings.beta_2, tau=settings.tau, **common)


def strategy_class(name: str) -> type[RoundAccounting]:
    """The strategy class registered as ``name``; a ConfigError listing the registered names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"federation.strategy={name!r} is not a registered strategy; registered: "
                          f"{', '.join(sorted(STRATEGIES))}") from None


def build_strategy(name: str, settings: StrategySettings, **common: Any) -> RoundAccounting:
    """Strategy ``name`` from its settings; ``common`` are the settings every
    strategy takes (``node_wait_seconds`` and flwr's sampling)."""
    cls = strategy_class(name)
    if not isinstance(settings, cls.settings_type):
        raise ConfigError(f"federation.strategy={name} takes {cls.settings_type.__name__}, not "
                          f"{type(settings).__name__}")
    return cls(settings, **common)


def make_strategy(cfg: RunConfig, required_hospitals: int, node_wait_seconds: float | None = None) -> RoundAccounting:
    """The configured strategy (``cfg.federation``), waiting at most
    ``node_wait_seconds`` (default ``federation.connect_timeout``) per round for
    ``required_hospitals`` hospitals (``federation.required_hospitals(connected)``)."""
    f = cfg.federation
    return build_strategy(
        f.strategy, f.strategy_settings,
        node_wait_seconds=f.connect_timeout if node_wait_seconds is None else node_wait_seconds,
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if f.fraction_evaluate > 0 else 0,
        min_available_nodes=required_hospitals,
    )
