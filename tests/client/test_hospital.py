"""client/hospital.py: the hospital's secret training randomness."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from client.hospital import training_seed


def test_the_training_seed_is_reproducible_for_the_same_key(tmp_path: Path) -> None:
    node = tmp_path / "node"
    first = [training_seed(node, r) for r in range(1, 6)]
    assert [training_seed(node, r) for r in range(1, 6)] == first  # the key is read back, not made anew
    assert len(set(first)) == len(first)  # every round draws other randomness
    # The key file, not the folder, decides: the same key elsewhere gives the same seeds.
    moved = tmp_path / "moved"
    shutil.copytree(node, moved)
    assert [training_seed(moved, r) for r in range(1, 6)] == first


def test_the_training_seed_is_secret_to_the_hospital(tmp_path: Path) -> None:
    """Another hospital (another key) draws other seeds for the same rounds: the
    server cannot replay a hospital's training from the round number."""
    ours = [training_seed(tmp_path / "a", r) for r in range(1, 6)]
    theirs = [training_seed(tmp_path / "b", r) for r in range(1, 6)]
    assert not set(ours) & set(theirs)
    key = tmp_path / "a" / "secrets" / "training.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert str(ours[0]) not in key.read_text()  # the file holds the key, not a seed
    # A new key (the old one moved away) gives new seeds.
    key.rename(tmp_path / "old.key")
    assert training_seed(tmp_path / "a", 1) != ours[0]


def _firewall_output(folder: Path, n: int = 4, size: int = 32) -> Path:
    """A firewall output folder (report, surrogates, masks) from clinic renders."""
    from privacy_firewall.images import write_png
    from privacy_firewall.report import DeidentificationReport, PhotoRecord, Status, save_report
    from synthetic_clinic import render_subject

    rows = []
    for i in range(n):
        s = render_subject(99, i, size)
        write_png(folder / "surrogates" / f"id{i}.png", s.pathological)
        write_png(folder / "masks" / f"id{i}.png", s.mask)
        rows.append((f"id{i}", PhotoRecord(Status.OK)))
    save_report(folder, DeidentificationReport.from_rows(rows, theta=6.0, theta_source="default"))
    return folder


def test_a_train_call_reads_the_report_once(tiny_config, tmp_path: Path, monkeypatch) -> None:
    """The ClientApp's train and evaluate read report.json once per call, through
    the firewall's typed loader: the pairs, the labels and the counts all come
    from that one read."""
    import builtins

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client import app as client_app
    from models import segmentation

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg, _ = tiny_config
    (tmp_path / "photos").mkdir()
    _firewall_output(tmp_path / "node" / "firewall")
    opened: list[str] = []
    real_path_open, real_open = Path.open, builtins.open

    def path_open(self, *args, **kwargs):
        opened.append(self.name)
        return real_path_open(self, *args, **kwargs)

    def plain_open(file, *args, **kwargs):
        opened.append(Path(str(file)).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "open", path_open)
    monkeypatch.setattr(builtins, "open", plain_open)
    monkeypatch.setattr(client_app, "run_config", lambda context: cfg)
    monkeypatch.setattr(client_app, "use_available_cores", lambda context: 1)
    monkeypatch.setattr(client_app.segmentation, "train", lambda model, pairs, *a, **k: {"train_loss": 0.5,
                                                                                         "num_examples": len(pairs)})
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "photos"),
                                                        "work-path": str(tmp_path / "node")},
                      state=RecordDict(), run_config={})
    arrays = ArrayRecord(segmentation.build_model(cfg.model).state_dict())
    train = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "local-epochs": 1})}),
                    dst_node_id=1, message_type="train")
    reply = client_app.train(train, context)
    assert not reply.has_error() and reply.content["metrics"]["firewall_accepted"] == 4
    assert opened.count("report.json") == 1
    opened.clear()
    evaluation = Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=1,
                         message_type="evaluate")
    assert not client_app.evaluate(evaluation, context).has_error()
    assert opened.count("report.json") == 1
