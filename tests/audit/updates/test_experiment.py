"""The privacy audit's attacks (audit/updates): linkage finds a planted patient and
a blind attacker scores chance; inversion recovers an image a tiny model leaks
exactly; the verdict is inconclusive whenever the positive control fails; the
whole audit runs end to end on a tiny model and writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from audit.updates import dp_view
from audit.updates.capture import fedavg_update, fedsgd_gradient, to_tensors, update_norm, used_parameters
from audit.updates.experiment import AuditData, AuditModels, AuditSettings, run_audit
from audit.updates.inversion import (
    INCONCLUSIVE,
    NOT_RECOVERED,
    RECOVERED,
    InversionBudget,
    invert_gradient,
    psnr,
    score_reconstruction,
    ssim,
    verdict,
)
from audit.updates.linkage import layer_signature, layerwise_cosine, link_rates, similarity_matrix

SIZE = 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tiny_unet() -> nn.Module:
    """Image -> per-pixel logits, with a BatchNorm like the project's U-Net."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))


def _gallery(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]
    masks = [rng.random((SIZE, SIZE)) > 0.6 for _ in range(n)]
    return images, masks


def _tiny_training(model: nn.Module, images, masks, seed: int) -> None:
    """A local training whose result depends on the seed (random flips), like the project's."""
    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = to_tensors(images, masks)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        x, y = x_all, y_all
        if torch.rand(1, generator=generator) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        x = torch.cat([x, x.flip(-2)])  # BatchNorm needs more than one value per channel
        y = torch.cat([y, y.flip(-2)])
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


# ----------------------------------------------------------------------------- linkage
def test_planted_update_is_linked_to_its_patient():
    model, loss_fn = _tiny_unet(), nn.BCEWithLogitsLoss()
    images, masks = _gallery(6)
    x, y = to_tensors(images[:1], masks[:1])
    names = used_parameters(model, loss_fn, x, y)
    candidates = []
    for img, m in zip(images, masks):
        xi, yi = to_tensors([img], [m])
        candidates.append(layer_signature(fedsgd_gradient(model, loss_fn, xi, yi, names)))
    candidates = torch.stack(candidates)
    # Each observation is exactly candidate i's gradient: the attack must find everyone.
    result = link_rates(similarity_matrix(candidates, candidates), [[i] for i in range(6)])
    assert result.top1 == 1.0 and result.top5 == 1.0
    assert result.chance_top1 == pytest.approx(1 / 6)
    assert layerwise_cosine(*[fedsgd_gradient(model, loss_fn, x, y, names)] * 2) == pytest.approx(1.0, abs=1e-6)


def test_gradient_probe_leaves_the_model_state_alone():
    model, loss_fn = _tiny_unet(), nn.BCEWithLogitsLoss()
    images, masks = _gallery(2)
    x, y = to_tensors(images, masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fedsgd_gradient(model, loss_fn, x, y, used_parameters(model, loss_fn, x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_blind_attacker_scores_chance():
    n = 8
    members = [[i] for i in range(n)]
    # every candidate scores the same: ties are broken at random
    tied = link_rates(np.zeros((n, n)), members)
    assert tied.top1 == pytest.approx(tied.chance_top1) and tied.top5 == pytest.approx(tied.chance_top5)
    assert tied.auc == pytest.approx(0.5)
    # scores that ignore the observation: exactly one patient is "found", and on
    # average a patient outscores half of the others
    same_ranking = np.tile(np.arange(n, dtype=float), (n, 1))
    assert link_rates(same_ranking, members).top1 == pytest.approx(1 / n)
    assert link_rates(same_ranking, members).auc == pytest.approx(0.5)
    # a perfect attacker
    assert link_rates(np.eye(n), members).auc == pytest.approx(1.0)
    # the interval holds the rate and narrows with more trials
    low, high = link_rates(same_ranking, members).top1_ci95
    assert low < 1 / n < high
    from audit.updates.linkage import wilson_interval

    assert np.subtract(*wilson_interval(0.1, 400)[::-1]) < np.subtract(*wilson_interval(0.1, 16)[::-1])


def test_batches_count_only_non_members_as_rivals():
    scores = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.15]])
    result = link_rates(scores, [[0, 1], [2, 3]])
    # patient 1 (0.8) need not beat its batch mate 0; patient 3 (0.15) loses to non-member 1 (0.2)
    assert result.top1 == pytest.approx(0.75)
    assert result.chance_top1 == pytest.approx(1 / 3)
    assert result.num_patients == 4


def test_mask_attacks_find_a_kept_outline_and_a_kept_size():
    from audit.updates.linkage import mask_iou_matrix, mask_size_and_count_matrix
    from privacy_firewall.masks import reshape_erythema_map
    from synthetic_clinic import render_subject

    masks = [m for m in (render_subject(4, i, 64).mask for i in range(24)) if m.any()]
    members = [[i] for i in range(len(masks))]
    iou = mask_iou_matrix(masks, masks)
    assert np.allclose(np.diag(iou), 1.0) and iou.max() <= 1.0
    assert link_rates(iou, members).top1 == 1.0
    # A mirrored, moved and bent outline defeats IoU but keeps size and count: the
    # size-and-count attacker still ranks the patient high, IoU does not.
    moved = [reshape_erythema_map(m, 50 + i, 0.1, 0.3) for i, m in enumerate(masks)]
    assert link_rates(mask_iou_matrix(moved, masks), members).top1 < 0.3
    assert link_rates(mask_size_and_count_matrix(moved, masks), members).auc > 0.7
    # Shuffled labels: the same attacker is blind.
    shuffled = [masks[(i + 7) % len(masks)] for i in range(len(masks))]
    assert link_rates(mask_size_and_count_matrix(shuffled, masks), members).auc < 0.65


def test_replay_with_the_known_seed_links_raw_photos():
    model = _tiny_unet()
    images, masks = _gallery(5, seed=1)
    names = [n for n, _ in model.named_parameters()]
    replays = torch.stack([layer_signature(fedavg_update(model, _tiny_training, [i], [m], 3, names))
                           for i, m in zip(images, masks)])
    # the hospital trained on photo 2 with seed 3: the attacker's replay is identical
    observed = layer_signature(fedavg_update(model, _tiny_training, [images[2]], [masks[2]], 3, names))
    scores = similarity_matrix(observed[None], replays)
    assert link_rates(scores, [[2]]).top1 == 1.0
    assert scores[0, 2] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- inversion
def test_inversion_recovers_what_a_linear_layer_leaks():
    """A fully connected first layer's gradient is (dL/dz) x^T: the image is in it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, SIZE * SIZE), nn.Unflatten(1, (1, SIZE, SIZE)))
    loss_fn = nn.BCEWithLogitsLoss()
    images, masks = _gallery(4, seed=2)
    x, y = to_tensors(images[:1], masks[:1])
    names = used_parameters(model, loss_fn, x, y)
    observed = fedsgd_gradient(model, loss_fn, x, y, names)
    recon, trace = invert_gradient(model, loss_fn, observed, masks[0], SIZE,
                                   InversionBudget(iterations=300, learning_rate=0.1, tv_weight=0.0))
    score = score_reconstruction(recon, images[0], images, 0)
    assert trace["iterations"] == 300
    assert score.nearest_is_patient and score.identifies_patient
    assert score.psnr_patient > 20


def test_verdict_is_inconclusive_when_the_positive_control_fails():
    assert verdict([False], [False]) == INCONCLUSIVE
    assert verdict([False, False], [True, False]) == INCONCLUSIVE
    assert verdict([False], []) == INCONCLUSIVE
    assert verdict([False], [True]) == NOT_RECOVERED
    assert verdict([True], [False]) == RECOVERED  # a success needs no control


def test_image_scores():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0.2
    # the average-face baseline is part of the score
    b = 255 - a
    assert score_reconstruction(a, a, [a, b], 0).identifies_patient
    # the gallery's mean face is no closer to the patient than the mean face itself
    mean_face = np.full_like(a, 128)
    assert not score_reconstruction(mean_face, a, [a, b], 0).identifies_patient


# ----------------------------------------------------------------------------- DP view
def test_dp_view_clips_and_noises_like_flower():
    update = {"w": torch.full((10_000,), 0.1), "b": torch.full((4,), 0.1)}
    assert dp_view.norm(update) == pytest.approx(update_norm(update), rel=1e-6)
    clipped = dp_view.clipped(update, 1.0)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    noised = dp_view.observed_under_central_dp(update, 1.0, 0.5, 4, np.random.default_rng(0))
    noise = noised["w"] - clipped["w"]
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05)  # z * C per coordinate
    unchanged = dp_view.observed_under_central_dp(update, 100.0, 0.0, 4, np.random.default_rng(0))
    assert torch.allclose(unchanged["w"], update["w"])


# ----------------------------------------------------------------------------- end to end
def test_the_audit_finds_a_firewall_that_passes_the_photos_through(tmp_path):
    """End to end on a tiny model, with a planted answer: "surrogates" that are
    the patients' photos themselves. Replay with the known seed and the pixel
    attacker must then link every patient, as they do on the raw photos; the
    inversion verdict follows its positive control; epsilon comes from the
    project's accountant."""
    from skinfed.differential_privacy import DpSettings, epsilon_per_round

    images, masks = _gallery(6, seed=3)
    data = AuditData(originals=images, original_masks=masks, surrogates=images[:4], surrogate_masks=masks[:4])
    trained = _tiny_unet()
    _tiny_training(trained, images[4:], masks[4:], 0)
    models = AuditModels(initial=_tiny_unet(), trained=trained, loss_fn=nn.BCEWithLogitsLoss(),
                         train=_tiny_training, trained_from="test")
    settings = AuditSettings(fedsgd_batch_sizes=(1, 2), hospital_seed=5, other_seed=6,
                             inversion=InversionBudget(iterations=5), noise_multipliers=(0.0, 1.0),
                             num_sampled_clients=2)

    def epsilon(z: float, delta: float, rounds: int) -> float:
        dp = DpSettings(mode="client-fixed", noise_multiplier=z, clipping_norm=1.0, num_sampled_clients=2,
                        population_size=4, delta=delta)
        return epsilon_per_round(dp, rounds)[-1]

    result = run_audit(data, models, settings, epsilon_fn=epsilon)
    summary = result.report["summary"]
    assert summary["linkage_chance"] == pytest.approx(1 / 6)
    assert summary["linkage_top1_raw_seed_known"] == 1.0  # raw photos + known seed: the replay is exact
    assert summary["linkage_top1_firewall_seed_known"] == 1.0  # and so it is for these "surrogates"
    assert summary["pixel_nearest_neighbour_top1"] == 1.0
    assert result.report["linkage"]["fedsgd_b2_trained"]["raw"]["num_patients"] == 4
    # Five iterations recover nothing, not even the positive control: so the verdict
    # is inconclusive, never "not recovered".
    assert summary["inversion_verdict"] == INCONCLUSIVE
    # Epsilon grows with the rounds and falls with more noise.
    eps_1, eps_5 = summary["dp_epsilon_1_round"], summary["dp_epsilon_5_rounds"]
    assert 0 < eps_1 < eps_5 < float("inf")
    assert epsilon(2.0, settings.delta, 5) < eps_5

    from audit.updates.report import write_report

    paths = write_report(tmp_path, result.report, result.images, data.originals, data.surrogates)
    assert json.loads(open(paths["report"]).read())["summary"] == json.loads(json.dumps(summary))
    assert open(paths["figure"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _one_sgd_step(model: nn.Module, images, masks, seed: int) -> None:
    """One full-batch SGD step on the mean loss, seed-free: a hospital's update is
    then the mean of its patients' own updates (to first order)."""
    x, y = to_tensors(images, masks)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-2)
    optimiser.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(torch.cat([x, x.flip(-2)])),
                                                   torch.cat([y, y.flip(-2)])).backward()
    optimiser.step()


def test_a_hospital_of_several_patients_is_one_update_and_each_patient_a_trial():
    """Hospitals of 3 patients drawn from 8; the local training is one seed-free SGD
    step, so a hospital's update sums its patients' own replays and every patient
    must outrank the non-members. Surrogates that are other people's photos (the
    next patient's) must not link to the patient."""
    images, masks = _gallery(12, seed=4)
    settings = AuditSettings(fedsgd_batch_sizes=(1,), hospital_seed=5, other_seed=6, inversion_patients=0,
                             noise_multipliers=(0.0,), num_sampled_clients=2, patients_per_hospital=3,
                             hospital_trials=5)
    models = AuditModels(initial=_tiny_unet(), trained=None, loss_fn=nn.BCEWithLogitsLoss(), train=_one_sgd_step)

    planted = AuditData(originals=images, original_masks=masks, surrogates=images[:8], surrogate_masks=masks[:8])
    report = run_audit(planted, models, settings).report
    link = report["linkage"]["fedavg_hospital_of_3_replay_seed_secret"]["firewall"]
    assert link["num_patients"] == 5 * 3  # every patient of every drawn hospital is a trial
    assert link["chance_top1"] == pytest.approx(1 / (12 - 3 + 1))
    assert link["top1"] >= 0.5 and link["auc"] >= 0.9  # chance: 0.1 and 0.5
    assert report["summary"]["hospital_linkage_trials"] == 15
    assert report["summary"]["hospital_linkage_top1_raw"] == pytest.approx(link["top1"])

    shifted = [images[(i + 1) % 8] for i in range(8)]  # each "surrogate" is another patient's photo
    unlinked = AuditData(originals=images, original_masks=masks, surrogates=shifted,
                         surrogate_masks=[masks[(i + 1) % 8] for i in range(8)])
    report = run_audit(unlinked, models, settings).report
    assert report["summary"]["hospital_linkage_top1_firewall"] < link["top1"]
    assert report["summary"]["hospital_linkage_auc_firewall"] < link["auc"]

    skipped = run_audit(planted, models, AuditSettings(**{**settings.to_dict(), "patients_per_hospital": 1,
                                                          "inversion": settings.inversion})).report
    assert "hospital_linkage_top1_firewall" not in skipped["summary"]


def test_the_controls_say_what_carries_the_link():
    """A hospital that trains on the gallery's average face with its patient's mask
    is found by the erythema-only replay; one that trains on the patient's photo
    with one shared mask is found by the image-only replay."""
    images, masks = _gallery(8, seed=11)
    average_face = np.mean(np.stack(images).astype(np.float64), axis=0).round().astype(np.uint8)
    shared = np.mean(np.stack(masks).astype(np.float64), axis=0) >= 0.25  # the audit's shared mask
    models = AuditModels(initial=_tiny_unet(), trained=None, loss_fn=nn.BCEWithLogitsLoss(), train=_tiny_training)
    settings = AuditSettings(fedsgd_batch_sizes=(1,), hospital_seed=5, other_seed=6, inversion_patients=0,
                             noise_multipliers=(0.0,), num_sampled_clients=2)

    erythema = AuditData(originals=images, original_masks=masks, surrogates=[average_face] * 8, surrogate_masks=masks)
    summary = run_audit(erythema, models, settings).report["summary"]
    assert summary["linkage_top1_firewall_erythema_only"] >= 0.75
    image = AuditData(originals=images, original_masks=masks, surrogates=images, surrogate_masks=[shared] * 8)
    summary = run_audit(image, models, settings).report["summary"]
    assert summary["linkage_top1_firewall_image_only"] >= 0.75


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_audit_says_when_the_device_it_is_asked_for_is_not_there(capsys):
    from audit.updates.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda", "--iterations", "10000"])
    assert stop.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "gpu0"])
    assert "--device='gpu0' is not a device: use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_pooled_audits_weigh_every_trial_once(tmp_path):
    import json

    from scripts.pool_audits import main as pool_main

    def report(ranks: list[float]) -> dict:
        members = [[i] for i in range(len(ranks))]
        scores = np.zeros((len(ranks), 16))
        for i, rank in enumerate(ranks):  # exactly ``rank`` of the 15 others score above the patient
            scores[i, [j for j in range(16) if j != i]] = np.arange(15)
            scores[i, i] = 14.5 - rank
        result = link_rates(scores, members)
        return {"gallery_size": 16, "linkage": {"fedavg": {"firewall": result.to_dict()}}}

    (tmp_path / "a.json").write_text(json.dumps(report([0, 0, 3, 9])))  # 2 of 4 linked
    (tmp_path / "b.json").write_text(json.dumps(report([0, 14, 14, 14, 14, 14, 14, 14])))  # 1 of 8
    assert pool_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "p.json")]) == 0
    pooled = json.loads((tmp_path / "p.json").read_text())["linkage"]["fedavg"]["firewall"]
    assert pooled["trials"] == 12 and pooled["top1"] == pytest.approx(3 / 12, abs=1e-4)
    assert pooled["top1_ci95"][0] < 0.25 < pooled["top1_ci95"][1]
    with pytest.raises(SystemExit, match="not a skinfed-audit report"):
        (tmp_path / "c.json").write_text("{}")
        pool_main([str(tmp_path / "c.json")])


# ----------------------------------------------------------------------------- the audit's glue
class LinksChosenPhotos:
    """A gate matcher that links exactly the given source photos (they are refused)."""

    name = "test matcher"
    threshold = 0.5
    false_match_rate = 0.01

    def __init__(self, linked: list[np.ndarray], firewall_settings) -> None:
        from privacy_firewall.firewall import PrivacyFirewall

        # The gate sees each photo as the backend works on it.
        firewall = PrivacyFirewall(firewall_settings, use_cache=False)
        self.linked = {firewall._prepare(p).pixels.tobytes() for p in linked}

    def distances(self, sources, surrogates):
        return np.array([0.0 if s.tobytes() in self.linked else 1.0 for s in sources])


def test_prepare_inputs_trains_on_accepted_surrogates_only(tiny_config, monkeypatch):
    """The audit's inputs from the project: the clinic's patients, and the
    firewall's surrogates of the photos it accepted; a photo the gate refuses
    stays in the gallery as someone else and is never trained on."""
    import privacy_firewall.firewall as firewall_module
    from audit.updates.cli import prepare_inputs
    from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
    from synthetic_clinic import render_subject

    cfg, overrides = tiny_config
    size = cfg.data.image_size
    # The run's own world (data.world), as the hospital's patients are.
    subjects = [render_subject(cfg.data.clinic_seed, i, size, world=cfg.data.world) for i in range(5)]
    matcher = LinksChosenPhotos([subjects[1].pathological], cfg.firewall)
    monkeypatch.setattr(firewall_module, "choose_matcher", lambda settings, backend: matcher)
    inputs = prepare_inputs(overrides, 5, None, AuditSettings())
    order = [0, 2, 3, 4, 1]  # the accepted patients first, then the refused photo
    data = inputs.data
    assert all(np.array_equal(o, subjects[i].pathological) for o, i in zip(data.originals, order, strict=True))
    assert all(np.array_equal(m, subjects[i].mask) for m, i in zip(data.original_masks, order, strict=True))
    assert len(data.surrogates) == len(data.surrogate_masks) == 4
    # The surrogates are the firewall's, as the hospital would have made them (same key, same cache).
    again = PrivacyFirewall(cfg.firewall).run([PhotoRequest(subjects[i].pathological, sex=subjects[i].subject.sex)
                                               for i in order[:4]])
    assert all(r.cached and np.array_equal(r.surrogate, s) for r, s in zip(again, data.surrogates))
    assert not any(np.array_equal(s, o) for s, o in zip(data.surrogates, data.originals))
    assert all(m.dtype == bool and m.shape == s.shape[:2] for m, s in zip(data.surrogate_masks, data.surrogates))
    # The labels are cut at the hospital's calibrated theta*, as `deidentify` cuts them.
    from privacy_firewall.calibration import cohort_masks

    cohort = cohort_masks(again, [None] * len(again), cfg.firewall.mask)
    assert inputs.settings.mask_threshold == pytest.approx(cohort.theta)
    assert all(np.array_equal(m, c) for m, c in zip(data.surrogate_masks, cohort.masks, strict=True))
    # The run's federation settings reach the audit; the hospital's seed is not the attacker's.
    s = inputs.settings
    assert (s.delta, s.num_rounds) == (cfg.federation.dp.delta, cfg.federation.num_rounds)
    assert s.hospital_seed != s.other_seed
    # Epsilon from the project's accountant: more rounds cost more, more noise less.
    assert 0 < inputs.epsilon_fn(1.0, 1e-5, 1) < inputs.epsilon_fn(1.0, 1e-5, 5) < float("inf")
    assert inputs.epsilon_fn(2.0, 1e-5, 5) < inputs.epsilon_fn(1.0, 1e-5, 5)


def test_prepare_inputs_names_why_too_few_photos_were_accepted(tiny_config, monkeypatch):
    import privacy_firewall.firewall as firewall_module
    from audit.updates.cli import prepare_inputs
    from synthetic_clinic import render_subject

    cfg, overrides = tiny_config
    everyone = [render_subject(cfg.data.clinic_seed, i, cfg.data.image_size, world=cfg.data.world).pathological
                for i in range(3)]
    matcher = LinksChosenPhotos(everyone, cfg.firewall)
    monkeypatch.setattr(firewall_module, "choose_matcher", lambda settings, backend: matcher)
    with pytest.raises(SystemExit, match=r"accepted 0 of 3 photos.*still identifiable"):
        prepare_inputs(overrides, 3, None, AuditSettings())
