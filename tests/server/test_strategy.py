"""The server's strategies: one named class per strategy, registered under its
name, each built from its own typed settings (federation.strategies.<name>),
the earlier flat keys still read, bad names and values refused once with what
to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError
from server.strategy import (
    STRATEGIES,
    RoundAccounting,
    SkinFedAdam,
    SkinFedAvg,
    SkinFedProx,
    build_strategy,
    make_strategy,
    strategy_class,
)
from skinfed.config import STRATEGY_SETTINGS, FedAdamSettings, FedProxSettings, load_run_config


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [5]


def _strategy(*overrides: str) -> RoundAccounting:
    return make_strategy(load_run_config(list(overrides)), required_hospitals=1, node_wait_seconds=1)


def test_every_registered_name_has_its_class_and_its_settings():
    assert set(STRATEGIES) == set(STRATEGY_SETTINGS) == {"fedavg", "fedprox", "fedadam"}
    expected = {"fedavg": (SkinFedAvg, FedAvg), "fedprox": (SkinFedProx, FedProx), "fedadam": (SkinFedAdam, FedAdam)}
    for name, (cls, flower) in expected.items():
        assert STRATEGIES[name] is cls and issubclass(cls, flower) and issubclass(cls, RoundAccounting)
        assert cls.settings_type is STRATEGY_SETTINGS[name]
        assert type(_strategy(f"federation.strategy={name}")) is cls


def test_the_settings_reach_flowers_strategy():
    prox = _strategy("federation.strategy=fedprox", "federation.strategies.fedprox.proximal_mu=0.3")
    assert prox.proximal_mu == 0.3
    adam = _strategy("federation.strategy=fedadam", "federation.strategies.fedadam.eta=0.05",
                     "federation.strategies.fedadam.beta_1=0.5", "federation.strategies.fedadam.beta_2=0.9",
                     "federation.strategies.fedadam.tau=0.01")
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.05, 0.5, 0.9, 0.01)
    # FedProx tells the hospitals its mu in every train message.
    messages = list(prox.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord({"local-epochs": 1}),
                                         FakeGrid()))
    assert messages[0].content["config"]["proximal-mu"] == 0.3


def _fedadam_step(eta: float) -> np.ndarray:
    """FedAdam's first step from 0 for one hospital whose model is w = 1."""
    strategy = build_strategy("fedadam", FedAdamSettings(eta=eta, beta_1=0.9, beta_2=0.99, tau=1e-3),
                              node_wait_seconds=1, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                              min_evaluate_nodes=1, min_available_nodes=1)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({"local-epochs": 1}),
                                         FakeGrid()))
    meta = Metadata(run_id=1, message_id="", src_node_id=5, dst_node_id=0, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    reply = Message(metadata=meta, content=RecordDict({
        "arrays": ArrayRecord({"w": torch.ones(3)}),
        "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 4, "firewall_accepted": 4, "firewall_refused": 0})}))
    assert sent
    arrays, _ = strategy.aggregate_train(1, [reply])
    return arrays.to_torch_state_dict()["w"].numpy()


def test_fedadams_learning_rate_is_the_step_size():
    small, large = _fedadam_step(0.05), _fedadam_step(0.1)
    assert np.all(small > 0) and np.allclose(large, 2 * small)  # toward the hospital, twice as far


def test_the_earlier_flat_keys_are_still_read():
    assert _strategy("federation.strategy=fedprox", "federation.proximal_mu=0.07").proximal_mu == 0.07
    assert _strategy("federation.strategy=fedadam", "federation.server_learning_rate=0.3").eta == 0.3
    cfg = load_run_config(["federation.proximal_mu=0.07"])
    saved = cfg.to_dict()["federation"]  # one home in the resolved configuration
    assert saved["proximal_mu"] is None and saved["strategies"]["fedprox"]["proximal_mu"] == 0.07


def test_a_saved_config_of_the_flat_spelling_keeps_its_values(tmp_path):
    """A run's config.yaml written before the strategies had their own settings."""
    import yaml

    from skinfed.config import load_saved_config

    old = load_run_config(["federation.strategy=fedprox"]).to_dict()
    del old["federation"]["strategies"]
    old["federation"].update(proximal_mu=0.2, server_learning_rate=0.4)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    federation = load_saved_config(tmp_path / "config.yaml").federation
    assert federation.strategy_settings == FedProxSettings(proximal_mu=0.2)
    assert federation.strategies["fedadam"]["eta"] == 0.4


@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.strategy=fedyogi"],
     "federation.strategy='fedyogi' is not a registered strategy; registered: fedadam, fedavg, fedprox"),
    (["+federation.strategies.fedyogi.eta=1"], "federation.strategies.fedyogi is not a registered strategy"),
    (["+federation.strategies.fedprox.mu=1"], "federation.strategies.fedprox.mu"),
    (["federation.strategies.fedprox.proximal_mu=0"], "federation.strategies.fedprox.proximal_mu=0.0 must be"),
    (["federation.strategies.fedprox.proximal_mu=abc"], "federation.strategies.fedprox.proximal_mu"),
    (["federation.strategies.fedadam.eta=-1"], "federation.strategies.fedadam.eta=-1.0 must be a number > 0"),
    (["federation.strategies.fedadam.beta_2=1.0"], "federation.strategies.fedadam.beta_2=1.0 must be in [0, 1)"),
    (["federation.strategy=fedprox", "federation.dp.mode=patient"],
     "federation.dp.mode=patient does not support federation.strategy=fedprox"),
])
def test_bad_strategies_are_refused_with_their_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(overrides)
    assert message in str(err.value)


def test_the_server_refuses_a_name_without_a_class():
    with pytest.raises(ConfigError, match="'fedyogi' is not a registered strategy; registered: fedadam, fedavg, fedprox"):
        strategy_class("fedyogi")
    with pytest.raises(ConfigError, match="takes FedProxSettings"):
        build_strategy("fedprox", FedAdamSettings(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3), node_wait_seconds=1)
