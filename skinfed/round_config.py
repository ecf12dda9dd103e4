"""What the server tells a hospital with each training round: the fields of the
train message's ``ConfigRecord``, defined once for both sides (server/app.py and
flwr's strategies write them, client/app.py reads them).

The run's settings reach a hospital once per run (its Hydra configuration); the
values that belong to a round come in the message, so every hospital trains the
round the way the server asked, whatever its local configuration says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

SERVER_ROUND = "server-round"  # set by flwr's strategies
LOCAL_EPOCHS = "local-epochs"  # set by the server (model.local_epochs)
PROXIMAL_MU = "proximal-mu"  # set by flwr's FedProx


@dataclass(frozen=True)
class TrainRound:
    """One training round as the server configured it."""

    server_round: int
    local_epochs: int
    proximal_mu: float = 0.0  # 0: plain FedAvg/FedAdam local training

    @classmethod
    def from_record(cls, record: Any) -> TrainRound:
        """The round from a train message's config; a clear error when the server
        sent no epochs (a server of another version)."""
        if LOCAL_EPOCHS not in record:
            raise ValueError(f"the train message has no {LOCAL_EPOCHS!r}: the server and this hospital run "
                             "different versions of the app")
        return cls(int(record.get(SERVER_ROUND, 0)), int(record[LOCAL_EPOCHS]), float(record.get(PROXIMAL_MU, 0.0)))


def train_config(local_epochs: int) -> ConfigRecord:
    """The server's part of every train message's config (flwr adds the round)."""
    return ConfigRecord({LOCAL_EPOCHS: int(local_epochs)})
