"""The hospital's ClientApp (client/app.py) through its handlers: typed replies,
the run's configuration composed once per run, and a round's values read from
the train message."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from models import segmentation
from privacy_firewall.watch import FirewallStatus, write_status
from skinfed.hospital_replies import NotReady, PrepareReply, TrainReply
from skinfed.round_config import TrainRound


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture
def run_env(tiny_config, monkeypatch):
    cfg, overrides = tiny_config
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join(overrides))
    client_app._RUN_CONFIGS.clear()
    return cfg


def _context(tmp_path, run_id: int = 5) -> Context:
    published = tmp_path / "published"
    published.mkdir(exist_ok=True)
    return Context(run_id=run_id, node_id=1, node_config={"deidentified-path": str(published),
                                                          "work-path": str(tmp_path / "work")},
                   state=RecordDict(), run_config={})


def _train_message(cfg, config: dict) -> Message:
    arrays = ArrayRecord(segmentation.build_model(cfg.model).state_dict())
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=1, message_type="train")


def test_a_hospital_not_ready_answers_with_fields_not_text(run_env, tmp_path):
    context = _context(tmp_path)
    write_status(tmp_path / "published", FirewallStatus("working", done=3, total=12))
    reply = client_app.train(_train_message(run_env, {"server-round": 1, "local-epochs": 1}), context)
    assert not reply.has_error() and len(reply.content.array_records) == 0  # no model
    assert NotReady.from_record(reply.content["metrics"]) == NotReady(ready=0, done=3, total=12)
    evaluation = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord()}), dst_node_id=1,
                         message_type="evaluate")
    assert dict(client_app.evaluate(evaluation, context).content["metrics"]) == {"ready": 0, "done": 3, "total": 12}
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="query")
    answer = PrepareReply.from_record(client_app.prepare(query, context).content["metrics"])
    assert answer == PrepareReply(ready=0, done=3, total=12, accepted=0, refused=0)


def test_the_run_configuration_is_composed_once_per_run(run_env, tmp_path, monkeypatch):
    calls = []
    real = client_app.load_flower_run_config
    monkeypatch.setattr(client_app, "load_flower_run_config", lambda record: calls.append(1) or real(record))
    write_status(tmp_path / "published", FirewallStatus("working", done=0, total=2))
    for _ in range(3):
        client_app.train(_train_message(run_env, {"server-round": 1, "local-epochs": 1}), _context(tmp_path, run_id=5))
    assert len(calls) == 1
    client_app.train(_train_message(run_env, {"server-round": 1, "local-epochs": 1}), _context(tmp_path, run_id=6))
    assert len(calls) == 2  # another run composes its own


def test_training_takes_the_rounds_epochs_from_the_message(run_env, tmp_path, monkeypatch):
    """The server's local-epochs decides, not the hospital's own model.local_epochs."""
    seen = {}

    def fake_train(model, pairs, cfg, epochs=None, **kwargs):
        seen.update(epochs=epochs, proximal_mu=kwargs["proximal_mu"])
        return {"train_loss": 0.25, "num_examples": 7}

    hospital = client_app.HospitalData(train=["pair"], validation=[], accepted=9, refused=2)
    monkeypatch.setattr(client_app, "local_hospital", lambda cfg, context: hospital)
    monkeypatch.setattr(client_app.segmentation, "train", fake_train)
    reply = client_app.train(_train_message(run_env, {"server-round": 2, "local-epochs": 3, "proximal-mu": 0.5}),
                             _context(tmp_path))
    assert seen == {"epochs": 3, "proximal_mu": 0.5} and run_env.model.local_epochs == 1
    assert TrainReply.from_record(reply.content["metrics"]) == TrainReply(train_loss=0.25, num_examples=7,
                                                                          firewall_accepted=9, firewall_refused=2)


def test_a_train_message_without_epochs_is_refused():
    with pytest.raises(ValueError, match="no 'local-epochs'"):
        TrainRound.from_record(ConfigRecord({"server-round": 1}))
    assert TrainRound.from_record(ConfigRecord({"server-round": 4, "local-epochs": 2})) == TrainRound(4, 2, 0.0)


def test_replies_carry_numbers_only():
    record = TrainReply(train_loss=torch.tensor(0.5).item(), num_examples=3, firewall_accepted=4,
                        firewall_refused=1).to_record()
    assert all(isinstance(v, (int, float)) for v in record.values())


def test_real_photos_are_refused_through_the_clientapps_query_and_train(tmp_path, monkeypatch):
    """The shipped embedded model and gate, through the handlers Flower calls: a
    hospital folder of real photos prepares nothing, and its train reply is an
    error that carries no model and no photo's name."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data as skimage_data

    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SKINFED_OVERRIDES", raising=False)
    client_app._RUN_CONFIGS.clear()
    photos = tmp_path / "photos"
    photos.mkdir()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        (photos / "grace_hopper.jpg").write_bytes(f.read())
    Image.fromarray(skimage_data.astronaut()).save(photos / "astronaut.png")
    context = Context(run_id=11, node_id=1, node_config={"data-path": str(photos), "work-path": str(tmp_path / "node")},
                      state=RecordDict(), run_config={})
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type="query")
    answer = PrepareReply.from_record(client_app.prepare(query, context).content["metrics"])
    assert answer == PrepareReply(ready=1, done=2, total=2, accepted=0, refused=2)
    cfg = client_app.run_config(context)
    with pytest.raises(client_app.NoUsableImages, match="2 refused by the firewall") as refused:
        client_app.train(_train_message(cfg, {"server-round": 1, "local-epochs": 1}), context)
    assert "grace_hopper" not in str(refused.value) and "astronaut" not in str(refused.value)
