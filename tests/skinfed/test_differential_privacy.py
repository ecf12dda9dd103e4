"""Differential privacy with Flower's wrappers and mods (skinfed/differential_privacy.py):
a config with DP on clips each hospital's update, the server noises the average,
and epsilon is finite and grows with the rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity

from skinfed.differential_privacy import (
    DpSettings,
    clamp_running_variances,
    client_mods,
    dp_train_config,
    dp_train_mod,
    epsilon_per_round,
    without_step_counters,
    wrap_strategy,
)

SIZE = 20_000  # coordinates: enough to measure the noise's standard deviation


@pytest.fixture(autouse=True)
def _inside_a_task(monkeypatch):
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _settings(mode: str = "client-fixed", **kw) -> DpSettings:
    base = {"noise_multiplier": 0.5, "clipping_norm": 2.0, "num_sampled_clients": 4, "population_size": 4,
            "delta": 1e-5}
    return DpSettings(mode=mode, **{**base, **kw})


def _global_arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(SIZE, np.float32)), "b": Array(np.zeros(3, np.float32))})


def _train_message(settings: DpSettings, node: int) -> Message:
    """What the server's DP wrapper sends a hospital: global arrays and the train config."""
    config = ConfigRecord({KEY_CLIPPING_NORM: settings.clipping_norm, **dp_train_config(settings)})
    return Message(RecordDict({"arrays": _global_arrays(), "config": config}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _hospital(update_scale: float, num_examples: int):
    """A ClientApp train function whose update has L2 norm ``update_scale * sqrt(SIZE)``."""

    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        new = ArrayRecord({"w": Array(arrays[0] + update_scale), "b": Array(arrays[1] + update_scale)})
        metrics = MetricRecord({"train_loss": 0.5, "num-examples": num_examples})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    return train


def _update_norm(reply: Message) -> float:
    arrays = reply.content["arrays"].to_numpy_ndarrays()
    return float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in arrays)))


def test_modes_pick_flowers_wrappers():
    inner = FedAvg()
    assert wrap_strategy(inner, _settings("off")) is inner
    assert isinstance(wrap_strategy(inner, _settings("client-fixed")), DifferentialPrivacyClientSideFixedClipping)
    assert isinstance(wrap_strategy(inner, _settings("server-fixed")), DifferentialPrivacyServerSideFixedClipping)
    adaptive = wrap_strategy(inner, _settings("client-adaptive", noise_multiplier=0.1))
    assert isinstance(adaptive, DifferentialPrivacyClientSideAdaptiveClipping)
    assert adaptive.clipping_norm == 2.0
    assert client_mods(_settings("off")) == [] and len(client_mods(_settings("client-fixed"))) == 1
    assert dp_train_config(_settings("off")) == {}


def test_adaptive_clipping_rejects_a_noise_it_cannot_split():
    # Flower's default clipped_count_stddev is num_sampled_clients / 20 = 0.2 here
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        _settings("client-adaptive", noise_multiplier=1.0)
    _settings("client-adaptive", noise_multiplier=1.0, clipped_count_stddev=1.0)


def test_dp_on_clips_each_update_and_the_server_adds_noise():
    settings = _settings("client-fixed")
    replies = []
    for node, (scale, examples) in enumerate([(0.1, 10), (0.5, 30), (0.001, 5), (0.2, 50)], start=1):
        msg = _train_message(settings, node)
        reply = dp_train_mod(msg, _context(node), _hospital(scale, examples))
        assert not reply.has_error()
        raw_norm = scale * math.sqrt(SIZE + 3)
        # Flower's fixedclipping_mod: norm min(raw, C)
        assert _update_norm(reply) == pytest.approx(min(raw_norm, settings.clipping_norm), rel=1e-4)
        # every hospital weighs the same under DP
        assert reply.content["metrics"]["num-examples"] == 1
        replies.append(reply)

    clipped_mean = np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in replies], axis=0)
    strategy = wrap_strategy(FedAvg(), settings)
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    aggregated, _ = strategy.aggregate_train(1, replies)
    noise = aggregated.to_numpy_ndarrays()[0] - clipped_mean
    expected_std = settings.noise_multiplier * settings.clipping_norm / settings.num_sampled_clients
    assert noise.std() == pytest.approx(expected_std, rel=0.05)
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(SIZE)


def test_dp_off_leaves_the_update_alone():
    msg = Message(RecordDict({"arrays": _global_arrays(), "config": ConfigRecord({})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    reply = dp_train_mod(msg, _context(1), _hospital(0.5, 7))
    assert _update_norm(reply) == pytest.approx(0.5 * math.sqrt(SIZE + 3), rel=1e-5)
    assert reply.content["metrics"]["num-examples"] == 7


def test_adaptive_mode_runs_flowers_adaptive_mod():
    settings = _settings("client-adaptive", noise_multiplier=0.1)
    reply = dp_train_mod(_train_message(settings, 1), _context(1), _hospital(0.5, 7))
    assert _update_norm(reply) == pytest.approx(settings.clipping_norm, rel=1e-4)
    assert reply.content["metrics"][KEY_NORM_BIT] == 1  # the update was clipped


def test_epsilon_is_finite_and_grows_with_rounds():
    eps = epsilon_per_round(_settings(noise_multiplier=1.0), 5)
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert all(b > a for a, b in zip(eps, eps[1:]))
    # more noise, less epsilon
    assert epsilon_per_round(_settings(noise_multiplier=2.0), 5)[-1] < eps[-1]


def test_batchnorm_state_survives_noise():
    bn = torch.nn.BatchNorm2d(4)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    assert "num_batches_tracked" not in without_step_counters(state)
    state["running_var"] -= 2.0  # what noise can do
    assert clamp_running_variances(state) == 4
    bn.load_state_dict(state)
    bn.eval()
    assert torch.isfinite(bn(torch.randn(2, 4, 3, 3))).all()
