"""Federated training: the trainer's firewall-only input, hospitals, the run
directory, the strategy's failure handling, and a whole in-process simulation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client.hospital import FirewallNotReady, load_hospital, prepare_hospital
from models import segmentation
from privacy_firewall.training_data import DeidentifiedPair, NotDeidentifiedError, load_deidentified
from skinfed.data import holdout_set, synthetic_hospitals

TESTS = Path(__file__).resolve().parent


def deidentify_hospital(cfg, folder):
    """The simulation's two steps: the firewall before round 1, then the pairs."""
    prepare_hospital(cfg, folder)
    return load_hospital(cfg, folder)


# ----------------------------------------------------------------------------- firewall-only training
def test_trainer_refuses_anything_but_firewall_output(tiny_config, tmp_path):
    cfg, _ = tiny_config
    model = segmentation.build_model(cfg.model)
    raw = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(NotDeidentifiedError):
        segmentation.train(model, [raw], cfg.model)
    with pytest.raises(NotDeidentifiedError):
        segmentation.train(model, [(raw, np.zeros((32, 32), bool))], cfg.model)
    with pytest.raises(NotDeidentifiedError):
        segmentation.train(model, str(tmp_path), cfg.model)
    with pytest.raises(NotDeidentifiedError):  # a pair cannot be forged
        DeidentifiedPair("x", raw, np.zeros((32, 32), bool))
    with pytest.raises(NotDeidentifiedError):  # a folder of photos is not a firewall output
        load_deidentified(tmp_path)


def test_hospital_trains_on_surrogates_only(tiny_config):
    cfg, _ = tiny_config
    folders = synthetic_hospitals(cfg, 2)
    assert len(folders) == 2
    # Disjoint hospitals that together hold the clinic; no ground-truth masks at a hospital.
    stems = [sorted(p.name for p in (f / "images").iterdir()) for f in folders]
    assert sum(map(len, stems)) == cfg.data.num_subjects
    assert len(set().union(*map(set, stems))) == cfg.data.num_subjects
    assert not any((f / "masks").exists() for f in folders)

    data = deidentify_hospital(cfg, folders[0])
    photos = {(f / "images" / s).read_bytes() for f, ss in zip(folders, stems) for s in ss}
    assert data.accepted == len(stems[0]) and data.refused == 0
    assert len(data.train) + len(data.validation) == data.accepted
    for pair in data.train + data.validation:
        assert isinstance(pair, DeidentifiedPair)
        assert pair.id not in "".join(stems[0])  # ids are opaque, not file stems
        assert pair.surrogate.dtype == np.uint8 and pair.mask.dtype == bool
        assert pair.surrogate.tobytes() not in photos
    result = segmentation.train(segmentation.build_model(cfg.model), data.train, cfg.model)
    assert np.isfinite(result["train_loss"]) and result["num_examples"] == len(data.train)


def test_failed_edits_never_reach_the_trainer(tiny_config):
    cfg, _ = tiny_config
    folder = synthetic_hospitals(cfg, 2)[0]
    with pytest.raises(FirewallNotReady):  # nothing before the firewall ran
        load_hospital(cfg, folder)
    data = deidentify_hospital(cfg, folder)
    out = next((folder.parents[3] / "nodes").iterdir()) / "firewall"
    report = json.loads((out / "report.json").read_text())
    victim = data.train[0].id
    report["images"][victim].update(status="failed", code="edit_failed")
    (out / "report.json").write_text(json.dumps(report))
    assert victim not in {p.id for p in load_deidentified(out)}
    # A report that contradicts itself (failed without a reason code) is no report: nothing is trained on.
    report["images"][victim]["code"] = None
    (out / "report.json").write_text(json.dumps(report))
    with pytest.raises(NotDeidentifiedError, match="run the firewall again"):
        load_deidentified(out)


def _firewall_output_like(folder, n: int = 8, size: int = 32):
    """A firewall output folder holding clinic faces and their true masks: a
    clean task to check that the trainer learns."""
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


def test_segmentation_learns_on_a_fixed_batch(tiny_config, tmp_path):
    """Dice + BCE training fits a few pairs: the loss falls and Dice rises."""
    cfg, _ = tiny_config
    pairs = load_deidentified(_firewall_output_like(tmp_path / "fw"))
    torch.manual_seed(0)
    model = segmentation.build_model(cfg.model)
    images, masks = [p.surrogate for p in pairs], [p.mask for p in pairs]
    before = segmentation.evaluate(model, images, masks)
    segmentation.train(model, pairs, replace(cfg.model, batch_size=2, learning_rate=3e-3), epochs=30)
    after = segmentation.evaluate(model, images, masks)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["dice"] > max(0.5, before["dice"] + 0.1)


def test_holdout_is_original_identities_with_ground_truth(tiny_config):
    cfg, _ = tiny_config
    images, masks = holdout_set(cfg)
    assert len(images) == cfg.data.holdout_subjects == len(masks)
    assert images[0].shape == (cfg.data.image_size, cfg.data.image_size, 3) and masks[0].any()


# ----------------------------------------------------------------------------- server pieces
def test_run_directory_records_and_resumes(tiny_config):
    from server.run_directory import ResumeError, RunDirectory

    cfg, _ = tiny_config
    run = RunDirectory.create(cfg, run_id=7)
    state = {"w": torch.ones(3)}
    run.record_round(0, {"dice": 0.1, "iou": 0.05}, {}, {}, state)
    run.record_round(1, {"dice": 0.3, "iou": 0.2}, {"train_loss": 1.2, "clients_trained": 2}, {"dice": 0.4}, {"w": 2 * torch.ones(3)})
    rounds = json.loads((run.path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["global_dice"] == 0.3 and rounds[1]["client_dice"] == 0.4 and rounds[1]["train_loss"] == 1.2
    assert (run.path / "metrics.csv").read_text().splitlines()[0].startswith("round,global_dice,global_iou")
    assert (run.path / "convergence.png").read_bytes()[:4] == b"\x89PNG"

    resumed = RunDirectory.create(replace(cfg, federation=replace(cfg.federation, resume="latest")), run_id=8)
    assert resumed.path == run.path and resumed.offset == 1
    assert torch.equal(resumed.checkpoint_state()["w"], 2 * torch.ones(3))
    run.finish(state, cfg)  # a finished run is not "latest" to resume
    with pytest.raises(ResumeError):
        RunDirectory.create(replace(cfg, federation=replace(cfg.federation, resume="latest")), run_id=9)


def test_strategy_drops_failed_hospitals(tiny_config, monkeypatch):
    from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.strategy import make_strategy

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg, _ = tiny_config
    strategy = make_strategy(cfg, required_hospitals=1)

    def reply(value: float, n: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), value)}),
                              "metrics": MetricRecord({"train_loss": value, "num-examples": n, "firewall_accepted": n,
                                                       "firewall_refused": 1})})
        return Message(content=content, dst_node_id=1, message_type="train")

    def failure() -> Message:
        meta = Metadata(run_id=1, message_id="", src_node_id=3, dst_node_id=0, reply_to_message_id="", group_id="1",
                        created_at=0.0, ttl=60.0, message_type="train")
        return Message(metadata=meta, error=Error(code=0, reason="hospital crashed"))

    arrays, metrics = strategy.aggregate_train(1, [reply(1.0, 1), reply(4.0, 3), failure()])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 3.25))  # weighted by examples
    summary = strategy.train_summary[1]
    assert summary["clients_trained"] == 2 and summary["clients_failed"] == 1
    assert summary["firewall_accepted"] == 4 and summary["firewall_refused"] == 2


# ----------------------------------------------------------------------------- a whole simulation
def test_simulation_two_hospitals_one_failing(tiny_config, monkeypatch, capsys):
    """flwr's simulation runtime, in process: hospital 1 raises every round, the
    run goes on with hospital 0, and the run directory has every round."""
    import sys

    from flwr.simulation import run_simulation

    from server.app import app as server_app

    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{Path(__file__).resolve().parents[2]}")
    from failing_client import app as client_app

    assert "failing_client" in sys.modules
    cfg, overrides = tiny_config
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join([*overrides, "federation.num_rounds=2"]))
    monkeypatch.setenv("SKINFED_TEST_FAIL_PARTITION", "1")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    runs = list(Path(cfg.paths.runs).glob("*/metrics.json"))
    assert len(runs) == 1
    rounds = json.loads(runs[0].read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_trained"] == 1 and r["clients_failed"] == 1 for r in rounds[1:])
    # The surviving hospital trained every round (its loss came back) and the new model was scored.
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in rounds[1:])
    assert all(math.isfinite(r["global_dice"]) for r in rounds)
    assert (runs[0].parent / "model.safetensors").is_file()
    text = json.dumps(rounds)
    assert "subject_" not in text and "/" not in text  # numbers only, no names or paths
    assert str(runs[0].parent) in capsys.readouterr().out


def test_hospital_without_usable_photos_is_reported(tiny_config, tmp_path):
    """Nothing the firewall accepts: no pairs, the refusals counted, the client
    sits the round out (its NoUsableImages is dropped by the strategy)."""
    cfg, _ = tiny_config
    folder = tmp_path / "hospital" / "images"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"not a photo")
    (folder / "empty.png").write_bytes(b"")
    data = deidentify_hospital(cfg, folder.parent)
    assert data.train == [] and data.validation == []
    assert data.accepted == 0 and data.refused == 2


@pytest.mark.slow
def test_killed_server_resumes_from_its_checkpoint(tiny_config, monkeypatch):
    """A run stopped after round 1 continues with round 2 in the same directory."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    cfg, overrides = tiny_config
    base = list(overrides)
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join([*base, "federation.num_rounds=1"]))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2)
    (run_dir,) = [p.parent for p in Path(cfg.paths.runs).glob("*/metrics.json")]
    (run_dir / "model.safetensors").unlink()  # as if killed before the end
    first = (run_dir / "checkpoint.pt").read_bytes()
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join([*base, "federation.num_rounds=2", "federation.resume=latest"]))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2)
    assert [p.parent for p in Path(cfg.paths.runs).glob("*/metrics.json")] == [run_dir]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert (run_dir / "checkpoint.pt").read_bytes() != first and (run_dir / "model.safetensors").is_file()
