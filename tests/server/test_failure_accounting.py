"""The server's failure accounting: which hospitals trained, failed,
were not ready, stopped for their privacy budget or never replied, per round, a
bounded wait for hospitals, and per-round seconds in the run directory. No
Flower runtime: a fake grid and hand-made replies."""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.strategy import NotEnoughHospitals, SkinFedAvg, classify_replies
from skinfed.config import FedAvgSettings
from skinfed.hospital_replies import BudgetSpent, NotReady

SUPERLINK = 1  # flwr's SUPERLINK_NODE_ID: the source of replies the SuperLink makes itself


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _meta(src: int, reply_to: str) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=src, dst_node_id=0, reply_to_message_id=reply_to,
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")


def _ok(src: int, reply_to: str, value: float = 1.0, n: int = 2) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), value)}),
                          "metrics": MetricRecord({"train_loss": value, "num-examples": n, "firewall_accepted": n,
                                                   "firewall_refused": 0})})
    return Message(metadata=_meta(src, reply_to), content=content)


def _error(src: int, reply_to: str, code: int, reason: str) -> Message:
    return Message(metadata=_meta(src, reply_to), error=Error(code=code, reason=reason))


def _not_ready(src: int, reply_to: str, done: int, total: int) -> Message:
    """What client/app.py answers when its firewall has published nothing yet."""
    return Message(metadata=_meta(src, reply_to), content=RecordDict({"metrics": NotReady.of(done, total).to_record()}))


def _over_budget(src: int, reply_to: str, epsilon: float, budget: float) -> Message:
    """What client/app.py answers under patient-level DP when the next round would pass the budget."""
    return Message(metadata=_meta(src, reply_to),
                   content=RecordDict({"metrics": BudgetSpent.of(epsilon, budget).to_record()}))


def test_replies_are_sorted_by_hospital():
    sent = {"m11": 11, "m12": 12, "m13": 13, "m14": 14, "m15": 15}
    replies = [
        _ok(11, "m11"),
        _error(12, "m12", 2, "<class 'client.app.HospitalError'>:<'train failed at the hospital with ValueError'>"),
        _not_ready(13, "m13", done=3, total=12),
        _error(SUPERLINK, "m14", 5, "Error: Node Unavailable"),  # made by the SuperLink: names our message
        # m15: no reply before the timeout
    ]
    outcome = classify_replies(sent, replies)
    assert outcome.trained == [11] and outcome.failed == [12] and outcome.not_ready == {13: (3, 12)}
    assert outcome.missed == [14, 15] and outcome.sent == [11, 12, 13, 14, 15]
    summary = outcome.summary()
    assert summary["clients_trained"] == 1 and summary["clients_failed"] == 4
    assert summary["clients_missed"] == 2 and summary["clients_not_ready"] == 1
    assert summary["hospitals_not_ready"] == [{"id": 13, "done": 3, "total": 12}]
    json.dumps(summary)  # ids and numbers only: JSON as is


class FakeGrid:
    """The part of flwr's Grid that configure_* uses: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _strategy(min_available: int, wait: float) -> SkinFedAvg:
    return SkinFedAvg(FedAvgSettings(), node_wait_seconds=wait, fraction_train=1.0, fraction_evaluate=1.0,
                      min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=min_available)


def test_a_round_remembers_its_hospitals_and_counts_silence_as_failure():
    strategy = _strategy(min_available=2, wait=5)
    messages = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), FakeGrid([21, 22])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [21, 22]
    for i, m in enumerate(messages):  # what flwr's grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"id{i}"
    answered = next(m for m in messages if m.metadata.dst_node_id == 21)
    arrays, _ = strategy.aggregate_train(1, [_ok(21, answered.metadata.message_id, value=3.0)])
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2,), 3.0))
    summary = strategy.train_summary[1]
    assert summary["hospitals_trained"] == [21] and summary["hospitals_missed"] == [22]
    assert summary["clients_trained"] == 1 and summary["clients_failed"] == 1


def test_the_wait_for_hospitals_is_bounded():
    strategy = _strategy(min_available=3, wait=0.3)
    started = time.monotonic()
    with pytest.raises(NotEnoughHospitals, match="2 hospital\\(s\\) connected .* 3 required"):
        strategy.configure_train(2, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), FakeGrid([1, 2]))
    assert time.monotonic() - started < 5
    assert strategy.min_available_nodes == 3  # restored after the round's sampling


def test_run_directory_records_seconds_per_round_and_hospital_ids(tiny_config):
    from server.run_directory import RunDirectory

    cfg, _ = tiny_config
    run = RunDirectory.create(cfg, run_id=3)
    state = {"w": torch.ones(2)}
    run.record_round(0, {"dice": 0.1}, {}, {}, state)
    time.sleep(0.3)
    train = {"clients_trained": 1, "clients_failed": 1, "clients_missed": 1, "hospitals_trained": [5],
             "hospitals_failed": [], "hospitals_missed": [9], "hospitals_not_ready": []}
    run.record_round(1, {"dice": 0.2}, train, {}, state)
    time.sleep(0.3)
    run.record_round(2, {"dice": 0.3}, train, {}, state)
    rounds = json.loads((run.path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["hospitals_missed"] == [9] and rounds[1]["clients_failed"] == 1
    assert 0.25 <= rounds[2]["seconds"] < rounds[2]["seconds_total"]  # this round alone, and since the start
    assert rounds[2]["seconds_total"] >= rounds[1]["seconds_total"] + 0.25
    header, row1 = (run.path / "metrics.csv").read_text().splitlines()[:3:2]
    assert header.startswith("round,global_dice") and "seconds_total" in header and "hospitals_missed" in header
    assert row1.split(",")[header.split(",").index("hospitals_missed")] == "9"


def test_not_ready_is_read_from_the_replys_fields_never_from_text():
    outcome = classify_replies({"m": 7}, [_not_ready(7, "m", done=3, total=12)])
    assert outcome.not_ready == {7: (3, 12)} and outcome.failed == [] and outcome.trained == []
    # The firewall never ran: 0 of 0, still not ready, not failed.
    outcome = classify_replies({"m": 7}, [_not_ready(7, "m", done=0, total=0)])
    assert outcome.summary()["hospitals_not_ready"] == [{"id": 7, "done": 0, "total": 0}]
    # An error whose text looks like the old signal is a failure like any other.
    outcome = classify_replies({"m": 7}, [_error(7, "m", 2, "<class 'X'>:<'not ready: 3 of 12 photos done'>")])
    assert outcome.failed == [7] and outcome.not_ready == {}


def test_counts_are_summed_over_hospitals_and_not_ready_ones_sit_out():
    strategy = _strategy(min_available=1, wait=1)
    replies = [_ok(41, "a", value=1.0, n=10), _ok(42, "b", value=4.0, n=30), _not_ready(43, "c", done=5, total=9)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 3.25))  # 10:30 weights, no 43
    assert metrics["firewall_accepted"] == 40 and metrics["num-examples"] == 40  # sums, not weighted means
    assert metrics["train_loss"] == pytest.approx(3.25)
    summary = strategy.train_summary[1]
    assert summary["firewall_accepted"] == 40 and summary["firewall_refused"] == 0
    assert summary["hospitals_trained"] == [41, 42] and summary["hospitals_not_ready"] == [{"id": 43, "done": 5,
                                                                                             "total": 9}]


def test_the_summed_keys_are_the_count_fields_of_the_replies():
    from server import strategy
    from skinfed.hospital_replies import SUMMED_KEYS, TrainReply

    assert not hasattr(strategy, "NOT_READY_PATTERN")
    assert {"firewall_accepted", "firewall_refused", "num-examples"} <= set(SUMMED_KEYS)
    assert "train_loss" not in SUMMED_KEYS and set(TrainReply.keys()) == {"train_loss", "num-examples",
                                                                          "firewall_accepted", "firewall_refused"}


def test_a_hospital_that_comes_back_is_sent_the_next_round():
    strategy = _strategy(min_available=1, wait=1)
    grid = FakeGrid([31])  # hospital 32 is down in round 1
    arrays = ArrayRecord({"w": torch.zeros(2)})
    assert [m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)] == [31]
    grid.nodes = [31, 32]  # ... and back for round 2
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)) == [31, 32]


def test_a_hospital_over_its_budget_is_its_own_outcome_read_from_fields():
    """A BudgetSpent reply: no model, not trained, not a failure of the ClientApp,
    its epsilon and budget recorded under the node's id; the round goes on with
    the others."""
    strategy = _strategy(min_available=1, wait=1)
    replies = [_ok(51, "a", value=2.0, n=10), _over_budget(52, "b", epsilon=4.5, budget=5.0),
               _not_ready(53, "c", done=1, total=4)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))  # 51 alone
    assert metrics["num-examples"] == 10
    summary = strategy.train_summary[1]
    assert summary["hospitals_trained"] == [51] and summary["hospitals_failed"] == []
    assert summary["clients_over_budget"] == 1 and summary["clients_not_ready"] == 1
    assert summary["clients_failed"] == 2  # both sat the round out
    assert summary["hospitals_dp_budget_spent"] == [{"id": 52, "epsilon": 4.5, "epsilon_budget": 5.0}]
    json.dumps(summary)


def test_a_budget_refusal_is_never_read_from_an_error_text():
    """An error whose text reads like a budget refusal is a failure like any other."""
    text = ("<class 'skinfed.patient_privacy.PrivacyBudgetSpent'>:<'privacy budget spent: epsilon 5.1 after this "
            "round would pass federation.dp.max_epsilon=5.0 (rounds trained 3, spent 4.2)'>")
    outcome = classify_replies({"m": 8}, [_error(8, "m", 2, text)])
    assert outcome.failed == [8] and outcome.over_budget == {}
    assert outcome.summary()["hospitals_dp_budget_spent"] == []
    import skinfed.patient_privacy as patient_privacy

    assert not [name for name in dir(patient_privacy) if "PATTERN" in name]
