"""What the server tells a hospital with each training round: the fields of the
train message's ``ConfigRecord``, defined once for both sides (server/app.py and
flwr's strategies write them, client/app.py reads them through :class:`TrainRound`).

The run's settings reach a hospital once per run (its Hydra configuration); the
round plan is the server's: the values that belong to a round come in the
message, so every hospital trains the round the way the server asked, whatever
its local configuration says. Every key the server sends is read here, except
the differential-privacy keys that Flower's clipping mods read
(:func:`skinfed.differential_privacy.dp_train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from flwr.app import ConfigRecord

SERVER_ROUND = "server-round"  # set by flwr's strategies
LOCAL_EPOCHS = "local-epochs"  # set by the server (model.local_epochs)
PROXIMAL_MU = "proximal-mu"  # set by flwr's FedProx (federation.strategies.fedprox.proximal_mu)
DP_RUN = "dp-run"  # patient-level DP: the ledger the round counts in (the run directory's name)


@dataclass(frozen=True)
class TrainRound:
    """One training round as the server configured it."""

    server_round: int
    local_epochs: int
    proximal_mu: float = 0.0  # 0: plain FedAvg/FedAdam local training
    dp_run: str = ""  # "": the hospital's default ledger (a server without patient-level DP)

    #: Every key :meth:`from_record` reads.
    KEYS: ClassVar[tuple[str, ...]] = (SERVER_ROUND, LOCAL_EPOCHS, PROXIMAL_MU, DP_RUN)

    @classmethod
    def from_record(cls, record: Any) -> TrainRound:
        """The round from a train message's config; a clear error when the server
        sent no epochs (a server of another version)."""
        if LOCAL_EPOCHS not in record:
            raise ValueError(f"the train message has no {LOCAL_EPOCHS!r}: the server and this hospital run "
                             "different versions of the app")
        return cls(server_round=int(record.get(SERVER_ROUND, 0)), local_epochs=int(record[LOCAL_EPOCHS]),
                   proximal_mu=float(record.get(PROXIMAL_MU, 0.0)), dp_run=str(record.get(DP_RUN, "")))


def train_config(local_epochs: int, dp_run: str | None = None) -> ConfigRecord:
    """The server's part of every train message's config: the round's local epochs,
    and under patient-level DP the run's ledger (flwr's strategies add the round,
    FedProx its mu)."""
    record = ConfigRecord({LOCAL_EPOCHS: int(local_epochs)})
    if dp_run:
        record[DP_RUN] = str(dp_run)
    return record
