"""Patient-level differential privacy (models/private_training.py, skinfed/patient_privacy.py,
skinfed/dp_check.py): DP-SGD on the U-Net, epsilon checked against Google's
dp-accounting (never against Opacus itself), accounting that survives a restart,
the budget, and the privacy officer's check of a run directory."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from common.config import ConfigError
from models import private_training
from models.segmentation import SegmentationSettings, build_model
from skinfed import dp_check, patient_privacy
from skinfed.config import DifferentialPrivacySettings

NUM_PAIRS, BATCH = 16, 4  # Poisson rate 4/16 = 0.25, 4 steps per epoch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clinic_renders():
    from synthetic_clinic import render_subject

    return [render_subject(99, i, 32) for i in range(NUM_PAIRS)]


@pytest.fixture
def pairs(clinic_renders, monkeypatch):
    """Clinic renders standing in for the firewall's pairs (the firewall's output
    and the trainer's refusal of anything else are tested in test_federated.py)."""
    monkeypatch.setattr(private_training, "require_training_pairs", list)
    return [SimpleNamespace(id=f"id{i}", surrogate=s.pathological, mask=s.mask) for i, s in enumerate(clinic_renders)]


def _model_settings(**kw) -> SegmentationSettings:
    base = dict(architecture="Unet", encoder="resnet18", encoder_weights_path=None, encoder_depth=3,
                decoder_channels=[16, 8, 4], learning_rate=1e-3, local_epochs=1, batch_size=BATCH, augment=True,
                dice_weight=1.0, bce_weight=1.0)
    return SegmentationSettings(**{**base, **kw})


def _run_cfg(num_rounds: int = 3, **dp) -> SimpleNamespace:
    dp_settings = DifferentialPrivacySettings(**{"mode": "patient", "noise_multiplier": 1.0, "clipping_norm": 1.0,
                                                 "delta": 1e-5, "target_epsilon": None, "max_grad_norm": 1.0,
                                                 "max_epsilon": None, **dp})
    return SimpleNamespace(federation=SimpleNamespace(dp=dp_settings, num_rounds=num_rounds), model=_model_settings())


def _private_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return private_training.make_private_compatible(build_model(_model_settings()))


def _independent_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return accountant.get_epsilon(delta)


# ----------------------------------------------------------------------------- the model and the loss
def test_the_private_unet_has_no_batchnorm_and_keeps_its_state_dict_names():
    from opacus.validators import ModuleValidator

    plain = build_model(_model_settings())
    private = private_training.make_private_compatible(build_model(_model_settings()))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in private.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in private.modules())
    assert ModuleValidator.validate(private, strict=False) == []
    weights = {k for k, v in plain.state_dict().items() if not k.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked"))}
    assert weights == set(private.state_dict())  # GroupNorm takes BatchNorm's weight and bias names


def test_the_loss_is_a_mean_of_per_image_losses():
    """Per-sample clipping bounds one patient's influence only if no other image enters its loss."""
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    alone = private_training.per_image_loss(logits[:1], target[:1])
    changed = logits.clone()
    changed[1:] = torch.randn(2, 1, 8, 8) * 5
    assert torch.allclose(private_training.per_image_loss(changed, target)[0], alone[0])
    assert private_training.per_image_loss(logits, target).shape == (3,)


# ----------------------------------------------------------------------------- epsilon
def test_dp_sgd_epsilon_agrees_with_dp_accounting_within_one_percent(pairs):
    model = _private_model()
    done = private_training.train_private(model, pairs, _model_settings(local_epochs=2), noise_multiplier=1.1,
                                          max_grad_norm=1.0, seed=3)
    # The plan, by hand: Poisson rate batch / N, N / batch steps per epoch, 2 epochs.
    assert (done.sample_rate, done.steps, done.num_examples) == (BATCH / NUM_PAIRS, 2 * NUM_PAIRS // BATCH, NUM_PAIRS)
    expected = _independent_epsilon(1.1, BATCH / NUM_PAIRS, 2 * NUM_PAIRS // BATCH, 1e-5)
    reported = private_training.epsilon_of([(done.noise_multiplier, done.sample_rate, done.steps)], 1e-5)
    assert reported == pytest.approx(expected, rel=0.01)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus' hooks are gone


def test_noise_for_a_target_epsilon_spends_it_over_the_planned_rounds(pairs, tmp_path):
    cfg, model = _run_cfg(num_rounds=3, target_epsilon=4.0), _private_model()
    for seed in range(3):
        result = patient_privacy.train_round(model, pairs, cfg, tmp_path, "run-a", seed=seed)
    metrics = result["metrics"]
    assert metrics["dp_rounds"] == 3 and metrics["dp_steps"] == 3 * NUM_PAIRS // BATCH and metrics["dp_uniform"] == 1
    spent = _independent_epsilon(metrics["dp_noise_multiplier"], BATCH / NUM_PAIRS, 3 * NUM_PAIRS // BATCH, 1e-5)
    assert 0.97 * 4.0 <= spent <= 1.01 * 4.0


# ----------------------------------------------------------------------------- the ledger
def test_a_resumed_hospital_goes_on_counting_epsilon(pairs, tmp_path):
    """Two rounds, then the state is read back from disk by a new object, then a
    third round: epsilon is the three rounds' accounting, never one round's."""
    cfg, model = _run_cfg(noise_multiplier=1.0), _private_model()
    for seed in (1, 2):
        patient_privacy.train_round(model, pairs, cfg, tmp_path, "run-a", seed=seed)
    reloaded = patient_privacy.PrivacyLedger.load(tmp_path, "run-a")
    assert len(reloaded.rounds) == 2
    third = patient_privacy.train_round(model, pairs, cfg, tmp_path, "run-a", seed=3)
    steps = NUM_PAIRS // BATCH
    three_rounds = _independent_epsilon(1.0, BATCH / NUM_PAIRS, 3 * steps, 1e-5)
    one_round = _independent_epsilon(1.0, BATCH / NUM_PAIRS, steps, 1e-5)
    assert third["metrics"]["epsilon"] == pytest.approx(three_rounds, rel=0.01)
    assert third["metrics"]["epsilon"] > 1.5 * one_round
    assert patient_privacy.PrivacyLedger.load(tmp_path, "run-a").epsilon() == pytest.approx(three_rounds, rel=0.01)
    # Another run on the same hospital is accounted on its own; the ledger is numbers only.
    other = patient_privacy.train_round(model, pairs, cfg, tmp_path, "run-b", seed=4)
    assert other["metrics"]["epsilon"] == pytest.approx(one_round, rel=0.01)
    ledger = tmp_path / "secrets" / patient_privacy.LEDGER_NAME
    assert ledger.is_file() and "id0" not in ledger.read_text() and "surrogate" not in ledger.read_text()
    assert not list((tmp_path / "secrets").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_a_hospital_refuses_to_train_past_its_budget(pairs, tmp_path):
    steps = NUM_PAIRS // BATCH
    one, two = (_independent_epsilon(1.0, BATCH / NUM_PAIRS, k * steps, 1e-5) for k in (1, 2))
    cfg = _run_cfg(noise_multiplier=1.0, max_epsilon=(one + two) / 2)
    patient_privacy.train_round(_private_model(), pairs, cfg, tmp_path, "run-a", seed=1)
    model = _private_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(patient_privacy.PrivacyBudgetSpent) as refused:
        patient_privacy.train_round(model, pairs, cfg, tmp_path, "run-a", seed=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained
    assert len(patient_privacy.PrivacyLedger.load(tmp_path, "run-a").rounds) == 1  # nothing accounted
    # The refusal carries its numbers as fields: the epsilon spent and the budget.
    assert refused.value.epsilon == pytest.approx(one, rel=0.01)
    assert refused.value.budget == cfg.federation.dp.max_epsilon


def test_the_clientapp_answers_a_spent_budget_with_a_typed_reply(pairs, tmp_path, monkeypatch, tiny_config):
    """Past its budget a hospital's train handler replies (no error, no model) with
    budget_spent=1 and its epsilon and budget; the server's accounting counts it
    as its own outcome, by node id."""
    from dataclasses import replace

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client import app as client_app
    from server.strategy import classify_replies
    from skinfed.hospital_replies import BudgetSpent

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages are made inside a task in real runs
        monkeypatch.setattr(TaskIdentity, attr, 1)
    steps = NUM_PAIRS // BATCH
    one, two = (_independent_epsilon(1.0, BATCH / NUM_PAIRS, k * steps, 1e-5) for k in (1, 2))
    run_cfg, _ = tiny_config
    dp = replace(_run_cfg().federation.dp, max_epsilon=(one + two) / 2)
    cfg = replace(run_cfg, model=_model_settings(), federation=replace(run_cfg.federation, dp=dp))
    monkeypatch.setattr(client_app, "run_config", lambda context: cfg)
    monkeypatch.setattr(client_app, "use_available_cores", lambda context: 1)
    monkeypatch.setattr(client_app, "local_hospital",
                        lambda cfg, context: client_app.HospitalData(train=pairs, validation=[], accepted=NUM_PAIRS,
                                                                     refused=0))
    context = Context(run_id=1, node_id=1, node_config={"deidentified-path": str(tmp_path / "pub"),
                                                        "work-path": str(tmp_path / "node")},
                      state=RecordDict(), run_config={})

    def train(server_round: int) -> Message:
        arrays = ArrayRecord(_private_model().state_dict())
        config = ConfigRecord({"server-round": server_round, "local-epochs": 1, "dp-run": "run-a"})
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{server_round}"
        return client_app.train(msg, context)

    first = train(1)
    assert not first.has_error() and len(first.content.array_records) == 1
    second = train(2)
    assert not second.has_error() and len(second.content.array_records) == 0  # no model
    spent = BudgetSpent.from_record(second.content["metrics"])
    assert spent.budget_spent == 1 and spent.epsilon == pytest.approx(one, rel=0.01)
    assert spent.epsilon_budget == dp.max_epsilon
    assert set(second.content["metrics"].keys()) == {"budget_spent", "epsilon", "epsilon_budget"}
    outcome = classify_replies({"m2": 9}, [second])
    assert outcome.over_budget == {9: (spent.epsilon, dp.max_epsilon)} and not outcome.trained + outcome.failed


# ----------------------------------------------------------------------------- the server's record and the check
def _reply(node: int, metrics: dict):
    record = SimpleNamespace(metric_records={"metrics": metrics})
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=record)


def test_the_run_records_the_largest_epsilon_and_the_check_recomputes_it(pairs, tmp_path, capsys):
    cfg, model = _run_cfg(noise_multiplier=0.9), _private_model()
    small = patient_privacy.train_round(model, pairs, cfg, tmp_path / "h1", "run", seed=1)
    for seed in (2, 3):
        large = patient_privacy.train_round(model, pairs, cfg, tmp_path / "h2", "run", seed=seed)
    summary = patient_privacy.round_summary([_reply(1, small["metrics"]), _reply(2, large["metrics"])])
    assert summary["epsilon"] == large["metrics"]["epsilon"] > small["metrics"]["epsilon"]
    assert summary["dp_accounting"]["hospital"] == 2 and summary["dp_accounting"]["accountant"] == "rdp"
    assert summary["dp_accounting"]["steps"] == 2 * NUM_PAIRS // BATCH
    run_dir = tmp_path / "runs" / "20260101-000000-1"
    run_dir.mkdir(parents=True)
    rounds = [{"round": 0}, {"round": 1, **summary}]
    (run_dir / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    written = patient_privacy.write_run_summary(run_dir, rounds)
    assert json.loads((run_dir / "privacy.json").read_text())["epsilon"] == written["epsilon"] == summary["epsilon"]

    assert dp_check.main([str(run_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checked"] == 1 and report["max_relative_difference"] < 0.01
    assert dp_check.main(["--ledger", str(tmp_path / "h2" / "secrets" / "patient_dp.json")]) == 0
    capsys.readouterr()
    # A misreported epsilon fails the check.
    rounds[1]["epsilon"] *= 1.05
    (run_dir / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    assert dp_check.main([str(run_dir)]) == 1


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("settings, key", [
    ({"target_epsilon": 0.0}, "federation.dp.target_epsilon"),
    ({"max_grad_norm": -1.0}, "federation.dp.max_grad_norm"),
    ({"max_epsilon": float("inf")}, "federation.dp.max_epsilon"),
    ({"noise_multiplier": 0.0}, "federation.dp.noise_multiplier"),
    ({"target_epsilon": 8.0, "max_epsilon": 3.0}, "federation.dp.max_epsilon"),
    ({"mode": "client-fixed", "target_epsilon": 3.0}, "federation.dp.target_epsilon"),
])
def test_patient_dp_settings_name_the_bad_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _run_cfg(**settings)


# ----------------------------------------------------------------------------- a whole federation
@pytest.mark.slow
def test_a_resumed_federation_continues_each_hospitals_epsilon(tiny_config, monkeypatch, capsys):
    """flwr's simulation with patient-level DP: one round, the server killed, the
    run resumed for a second: the hospitals' epsilon is two rounds' accounting
    (dp-accounting), metrics.json and privacy.json record it, the check agrees."""
    from pathlib import Path

    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    cfg, overrides = tiny_config
    base = [*overrides, "federation.dp.mode=patient", "federation.dp.noise_multiplier=1.0"]
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join([*base, "federation.num_rounds=1"]))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2)
    (run_dir,) = [p.parent for p in Path(cfg.paths.runs).glob("*/metrics.json")]
    (run_dir / "model.safetensors").unlink()  # as if killed before the end
    first = json.loads((run_dir / "metrics.json").read_text())["rounds"][1]
    monkeypatch.setenv("SKINFED_OVERRIDES", " ".join([*base, "federation.num_rounds=2", "federation.resume=latest"]))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    second = rounds[2]
    acc = second["dp_accounting"]
    assert acc["accountant"] == "rdp" and acc["rounds"] == 2 and first["dp_accounting"]["rounds"] == 1
    # Node ids change with a new simulation: every hospital's epsilon grew, so the extremes did too.
    before, after = first["hospitals_epsilon"].values(), second["hospitals_epsilon"].values()
    assert len(after) == 2 and min(after) > min(before) and max(after) > max(before)
    assert second["epsilon"] == pytest.approx(
        _independent_epsilon(acc["noise_multiplier"], acc["sampling_rate"], acc["steps"], acc["delta"]), rel=0.01)
    assert second["epsilon"] > 1.2 * first["epsilon"]  # counted on, not from zero
    assert json.loads((run_dir / "privacy.json").read_text())["epsilon"] == second["epsilon"]
    assert dp_check.main([str(run_dir)]) == 0
    assert "subject_" not in json.dumps(rounds) and "patient-level DP: epsilon" in capsys.readouterr().out
    # The membership audit of the same global model (shadows on public renders, the run's DP-SGD).
    from audit.updates import cli as audit_cli

    assert audit_cli.main(["--membership", str(run_dir), "--membership-only", "--shadows", "2",
                           "--shadow-epochs", "1"]) == 0
    audit = json.loads((run_dir / "membership.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == audit
    assert audit["epsilon"] == second["epsilon"] and set(audit["attacks"]) == {"loss_threshold", "lira_offline"}
    assert all(0.0 <= a["auc"] <= 1.0 for a in audit["attacks"].values())
