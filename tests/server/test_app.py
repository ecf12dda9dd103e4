"""The ServerApp: its closing lines, and a whole run on a scripted grid."""

from __future__ import annotations

import pytest
from flwr.app import Message

from server.app import dice_line


def test_the_dice_line_names_the_final_and_the_best_round():
    rounds = [{"round": 0, "global_dice": 0.9}, {"round": 1, "global_dice": 0.5},
              {"round": 2, "global_dice": 0.7}, {"round": 3, "global_dice": 0.6}]
    # round 0 is the untrained model and never the best round
    assert dice_line(rounds) == "global Dice: final 0.600 (round 3), best 0.700 (round 2)"


def test_no_dice_line_without_scored_rounds():
    assert dice_line([{"round": 0, "global_dice": 0.1}]) is None
    assert dice_line([{"round": 1}, {"round": 2, "global_dice": None}]) is None


# ----------------------------------------------------------------------------- a whole run, on a fake grid
class ScriptedGrid:
    """The part of flwr's Grid the ServerApp uses, answering for two hospitals as
    client/app.py would: hospital 1 trains, hospital 2 has spent its privacy budget.
    Keeps every train message's config keys."""

    def __init__(self) -> None:
        self.nodes = [1, 2]
        self.train_configs: list[set[str]] = []
        self.sent = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ArrayRecord, RecordDict

        from skinfed.hospital_replies import BudgetSpent, EvaluateReply, PrepareReply, TrainReply
        from skinfed.patient_privacy import accounting_metrics

        replies = []
        for message in messages:
            self.sent += 1
            message.metadata.__dict__["_message_id"] = f"m{self.sent}"  # what pushing does
            kind, node = message.metadata.message_type, message.metadata.dst_node_id
            if kind == "query":
                metrics = PrepareReply(ready=1, done=4, total=4, accepted=4, refused=0).to_record()
                content = RecordDict({"metrics": metrics})
            elif kind == "train":
                self.train_configs.append(set(message.content["config"].keys()))
                if node == 2:
                    content = RecordDict({"metrics": BudgetSpent.of(epsilon=4.2, budget=5.0).to_record()})
                else:
                    metrics = TrainReply(train_loss=float("nan"), num_examples=3, firewall_accepted=4,
                                         firewall_refused=0).to_record()
                    metrics.update(accounting_metrics([(1.0, 0.25, 4)], 1e-5, 1.5))
                    state = message.content["arrays"].to_torch_state_dict()
                    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
            else:
                metrics = EvaluateReply(dice=0.5, iou=0.4, loss=0.3, num_examples=2).to_record()
                content = RecordDict({"metrics": metrics})
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.fixture
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)


def test_a_run_composes_once_sends_only_keys_that_are_read_and_reports_budget_stops(
        tiny_config, monkeypatch, capsys, _task_identity):
    """The ServerApp on a scripted grid, patient-level DP, 2 rounds: Hydra composes
    once; every key of the train config is one the hospital's typed reader reads;
    the hospital over its budget is its own outcome in metrics.json and the run
    summary names it, and the federation goes on with the other."""
    import json
    from pathlib import Path

    from flwr.app import Context, RecordDict

    import common.config
    import server.app as server_app
    from skinfed.round_config import TrainRound

    cfg, overrides = tiny_config
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join([*overrides, "federation.num_hospitals=2", "federation.num_rounds=2",
                                                      "federation.dp.mode=patient"]))
    composed = []
    real_compose = common.config.compose
    monkeypatch.setattr(common.config, "compose", lambda *a, **k: composed.append(a) or real_compose(*a, **k))
    threads = []
    monkeypatch.setattr(server_app, "use_threads", threads.append)
    grid = ScriptedGrid()
    server_app.main(grid, Context(run_id=4, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    assert len(composed) == 1
    assert len(threads) == 1 and threads[0] >= 1
    # Two rounds to two hospitals; the hospital's reader reads every key sent (no Flower DP: no mod keys).
    assert len(grid.train_configs) == 4
    read: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

    for keys in grid.train_configs:
        read.clear()
        TrainRound.from_record(Recording(dict.fromkeys(keys, 1)))
        assert keys == read & keys == {"server-round", "local-epochs", "dp-run"}

    (run_dir,) = [p.parent for p in Path(cfg.paths.runs).glob("*/metrics.json")]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["hospitals_trained"] == [1] and record["hospitals_failed"] == []
        assert record["hospitals_dp_budget_spent"] == [{"id": 2, "epsilon": 4.2, "epsilon_budget": 5.0}]
        assert record["clients_trained"] == 1 and record["hospitals_epsilon"] == {"1": 1.5}
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["hospitals_dp_budget_spent_from_round"] == {"2": 1}
    out = capsys.readouterr().out
    assert "budget spent at hospital(s) 2 (from round 1)" in out
    assert "1 ok, 1 failed (1 over their privacy budget: 2)" in out
