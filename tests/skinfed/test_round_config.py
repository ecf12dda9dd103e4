"""No dead keys: every key the server puts in a train message's ConfigRecord is
read at the hospital, by the typed reader (skinfed.round_config.TrainRound) or,
for Flower's central DP, by the clipping mods; and the hospital trains the
round the way the message says, not the way its own configuration does."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from skinfed.differential_privacy import DP_CLIPPING_KEY, DP_UNIFORM_WEIGHT_KEY
from skinfed.round_config import TrainRound

#: What Flower's DP wrappers and skinfed.differential_privacy.dp_train_mod read.
DP_MOD_KEYS = {DP_CLIPPING_KEY, DP_UNIFORM_WEIGHT_KEY, KEY_CLIPPING_NORM}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


class ReadKeys(dict):
    """A config that remembers which keys were read."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _sent_config(overrides: list[str]) -> tuple[ConfigRecord, object]:
    """The ConfigRecord the ServerApp's strategy puts in round 3's train messages."""
    from server.app import dp_settings, round_plan
    from server.strategy import make_strategy
    from skinfed.config import load_run_config
    from skinfed.differential_privacy import wrap_strategy

    cfg = load_run_config(["model.local_epochs=3", *overrides])
    dp = dp_settings(cfg, 2)
    strategy = wrap_strategy(make_strategy(cfg, required_hospitals=2, node_wait_seconds=1), dp)
    messages = list(strategy.configure_train(3, ArrayRecord({"w": torch.zeros(2)}), round_plan(cfg, dp, "run-7"),
                                             FakeGrid()))
    assert len(messages) == 2
    return messages[0].content["config"], cfg


@pytest.mark.parametrize("overrides", [
    [],
    ["federation.strategy=fedprox", "federation.strategies.fedprox.proximal_mu=0.25"],
    ["federation.strategy=fedadam"],
    ["federation.dp.mode=patient"],
    ["federation.strategy=fedadam", "federation.dp.mode=patient"],
    ["federation.dp.mode=client-fixed"],
    ["federation.dp.mode=client-adaptive", "federation.dp.noise_multiplier=0.1"],
    ["federation.dp.mode=server-fixed"],
    ["federation.strategy=fedprox", "federation.strategies.fedprox.proximal_mu=0.25", "federation.dp.mode=server-adaptive",
     "federation.dp.noise_multiplier=0.1"],
])
def test_every_key_the_server_sends_is_read_at_the_hospital(overrides):
    config, cfg = _sent_config(overrides)
    sent = set(config.keys())
    record = ReadKeys(dict(config))
    plan = TrainRound.from_record(record)
    assert record.read <= set(TrainRound.KEYS)
    by_reader = sent & record.read
    assert sent - by_reader <= DP_MOD_KEYS  # anything else would be a dead key
    if cfg.federation.dp.mode in ("off", "patient"):
        assert sent == by_reader  # no Flower DP: the typed reader reads them all
    else:
        assert sent - by_reader  # the mods' keys are there
    # ... and what it read is the server's plan for the round.
    assert (plan.server_round, plan.local_epochs) == (3, 3)
    assert plan.proximal_mu == (0.25 if cfg.federation.strategy == "fedprox" else 0.0)
    assert plan.dp_run == ("run-7" if cfg.federation.dp.mode == "patient" else "")


def test_the_reader_reads_each_of_its_keys():
    """TrainRound.KEYS is what from_record really reads, no more, no less."""
    record = ReadKeys({"server-round": 2, "local-epochs": 1, "proximal-mu": 0.5, "dp-run": "r"})
    assert TrainRound.from_record(record) == TrainRound(2, 1, 0.5, "r")
    assert record.read == set(TrainRound.KEYS)


def test_under_patient_dp_the_hospital_trains_the_epochs_of_the_message(tiny_config, tmp_path, monkeypatch):
    """Patient-level DP takes local-epochs from the round config too: DP-SGD runs
    (and accounts) the server's epochs, not the hospital's model.local_epochs."""
    from dataclasses import replace

    from flwr.app import Context, Message, RecordDict

    from client import app as client_app
    from models import private_training
    from skinfed.patient_privacy import build_federated_model

    cfg, _ = tiny_config
    cfg = replace(cfg, federation=replace(cfg.federation, dp=replace(cfg.federation.dp, mode="patient")))
    seen = {}

    def fake_private(model, pairs, model_cfg, *, epochs=None, **kwargs):
        seen["epochs"] = epochs
        return private_training.PrivateRound(num_examples=len(pairs), sample_rate=0.5, steps=2 * epochs,
                                             noise_multiplier=kwargs["noise_multiplier"], train_loss=0.1)

    monkeypatch.setattr(client_app, "run_config", lambda context: cfg)
    monkeypatch.setattr(client_app, "local_hospital",
                        lambda cfg, context: client_app.HospitalData(train=["a", "b"], validation=[], accepted=2,
                                                                     refused=0))
    monkeypatch.setattr(private_training, "train_private", fake_private)
    monkeypatch.setattr(client_app, "use_available_cores", lambda context: 1)
    arrays = ArrayRecord(build_federated_model(cfg).state_dict())
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "local-epochs": 4,
                                                                        "dp-run": "run-x"})}),
                  dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"deidentified-path": str(tmp_path / "pub"),
                                                        "work-path": str(tmp_path / "node")},
                      state=RecordDict(), run_config={})
    reply = client_app.train(msg, context)
    assert not reply.has_error()
    assert seen["epochs"] == 4 != cfg.model.local_epochs
    assert reply.content["metrics"]["dp_steps"] == 8
    ledger = (tmp_path / "node" / "secrets" / "patient_dp.json").read_text()
    assert '"run-x"' in ledger  # the round counted in the run the message named
