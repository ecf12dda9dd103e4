"""What a hospital's ClientApp tells the server: the fields of each reply's
``MetricRecord``, defined once for both sides (client/app.py writes them,
server/app.py and server/strategy.py read them).

Only numbers cross the wire: counts, losses and scores; no file names, paths,
ids or reason texts. Each field says how the server combines it over the
hospitals: a count is summed (``combine="sum"``), anything else is averaged
weighted by Flower's ``num-examples``.

A hospital whose firewall has not finished answers a train or evaluate message
with :class:`NotReady` (``ready=0``, ``done`` of ``total`` photos) instead of a
model; under patient-level DP a hospital whose next round would pass its epsilon
budget answers a train message with :class:`BudgetSpent` (``budget_spent=1`` and
its epsilon). The server reads the fields, never an error text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import MetricRecord

#: Flower's weight key (FedAvg's ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"
#: ``0`` in :class:`NotReady`, ``1`` in a ready :class:`PrepareReply`; train and
#: evaluate replies with a model do not carry it.
READY = "ready"
#: ``1`` in :class:`BudgetSpent`; no other reply carries it.
BUDGET_SPENT = "budget_spent"


def _field(key: str | None = None, combine: str = "mean") -> Any:
    return field(metadata={"key": key, "combine": combine})


@dataclass(frozen=True)
class Reply:
    """A reply's metrics; subclasses name their fields (``key`` when the wire name differs)."""

    def to_record(self) -> MetricRecord:
        return MetricRecord({wire_key(f): _number(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def from_record(cls, record: Any) -> Reply:
        """The reply a hospital sent; a ValueError naming the missing field."""
        missing = [wire_key(f) for f in fields(cls) if wire_key(f) not in record]
        if missing:
            raise ValueError(f"a {cls.__name__} without {', '.join(missing)}: the hospital runs another app version")
        return cls(**{f.name: record[wire_key(f)] for f in fields(cls)})

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(wire_key(f) for f in fields(cls))


def wire_key(f: Any) -> str:
    return f.metadata.get("key") or f.name


def _number(value: Any) -> int | float:
    return int(value) if isinstance(value, (bool, int)) else float(value)


@dataclass(frozen=True)
class PrepareReply(Reply):
    """The answer to the server's query before round 1: the firewall's progress."""

    ready: int = _field()  # 1: the firewall has published pairs to train on
    done: int = _field(combine="sum")  # photos the firewall has been through ...
    total: int = _field(combine="sum")  # ... of this many
    accepted: int = _field(combine="sum")  # de-identified
    refused: int = _field(combine="sum")  # refused or failed (fail closed)


@dataclass(frozen=True)
class NotReady(Reply):
    """A train or evaluate message that came before the firewall published anything."""

    ready: int = _field()  # always 0
    done: int = _field(combine="sum")
    total: int = _field(combine="sum")

    @classmethod
    def of(cls, done: int, total: int) -> NotReady:
        return cls(0, int(done), int(total))


@dataclass(frozen=True)
class BudgetSpent(Reply):
    """A train message to a hospital whose next round would take its patient-level
    epsilon past its budget (``federation.dp.max_epsilon``, or a
    ``target_epsilon`` no noise can keep): it trains nothing, sends no model and
    says where it stands."""

    budget_spent: int = _field()  # always 1
    epsilon: float = _field()  # spent in this run so far
    epsilon_budget: float = _field()  # the budget the next round would pass

    @classmethod
    def of(cls, epsilon: float, budget: float) -> BudgetSpent:
        return cls(1, float(epsilon), float(budget))


@dataclass(frozen=True)
class TrainReply(Reply):
    """A hospital's training round."""

    train_loss: float = _field()
    num_examples: int = _field(NUM_EXAMPLES, combine="sum")
    firewall_accepted: int = _field(combine="sum")
    firewall_refused: int = _field(combine="sum")


@dataclass(frozen=True)
class EvaluateReply(Reply):
    """A hospital's score of the global model on its validation surrogates."""

    dice: float = _field()
    iou: float = _field()
    loss: float = _field()
    num_examples: int = _field(NUM_EXAMPLES, combine="sum")


#: Every reply's fields that are counts: summed over the hospitals, never averaged.
SUMMED_KEYS: tuple[str, ...] = tuple(sorted({wire_key(f) for reply in (PrepareReply, NotReady, BudgetSpent, TrainReply,
                                                                       EvaluateReply)
                                             for f in fields(reply) if f.metadata["combine"] == "sum"}))
#: Everything a hospital sends the server without patient-level DP (docs/deployment.md
#: lists them); patient-level DP adds its accounting and :class:`BudgetSpent`.
SENT_KEYS: tuple[str, ...] = tuple(sorted({k for reply in (PrepareReply, NotReady, TrainReply, EvaluateReply)
                                           for k in reply.keys()}))


def progress_if_not_ready(record: Any) -> tuple[int, int] | None:
    """(done, total) when ``record`` (a reply's MetricRecord) says the hospital's
    firewall is not ready, else None."""
    if READY in record and int(record[READY]) == 0:
        return int(record.get("done", 0)), int(record.get("total", 0))
    return None


def budget_if_spent(record: Any) -> BudgetSpent | None:
    """The :class:`BudgetSpent` that ``record`` (a reply's MetricRecord) is, else None."""
    if BUDGET_SPENT in record and int(record[BUDGET_SPENT]) == 1:
        return BudgetSpent.from_record(record)
    return None
