"""Membership inference on the global model (audit/updates/membership.py): the
attacks find the members of an overfit model, and see nothing when "members" and
"non-members" are drawn alike and neither was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.updates import membership
from models import segmentation
from synthetic_clinic import render_subject

SIZE, MEMBERS, CANDIDATES = 32, 8, 24
PATIENT_SEED, PUBLIC_SEED = 5, 4242  # the shadows' public data: a clinic seed no candidate comes from


def _settings() -> segmentation.SegmentationSettings:
    return segmentation.SegmentationSettings(
        architecture="Unet", encoder="resnet18", encoder_weights_path=None, encoder_depth=3,
        decoder_channels=[16, 8, 4], learning_rate=3e-3, local_epochs=1, batch_size=4, augment=False,
        dice_weight=1.0, bce_weight=1.0)


def _renders(seed: int, start: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    subjects = [render_subject(seed, i, SIZE) for i in range(start, start + count)]
    return [s.pathological for s in subjects], [s.mask for s in subjects]


def _trained(images, masks, seed: int, epochs: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)  # one public initialisation, as the federation's
    model = segmentation.build_model(_settings())
    segmentation.train_centralised_baseline(model, images, masks, _settings(), epochs=epochs, seed=seed)
    return model


@pytest.fixture(scope="module")
def overfit_world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        members = _renders(PATIENT_SEED, 0, MEMBERS)
        target = _trained(*members, seed=1)
        public = _renders(PUBLIC_SEED, 0, 2 * MEMBERS)
        shadows = membership.train_shadow_models(lambda x, y, s: _trained(x, y, s), *public, num_shadows=2,
                                                 shadow_size=MEMBERS, seed=7)
        yield {"target": target, "shadows": shadows, "members": members,
               "non_members": _renders(PATIENT_SEED, MEMBERS, CANDIDATES),
               "unseen_a": _renders(PATIENT_SEED, MEMBERS + CANDIDATES, CANDIDATES),
               "unseen_b": _renders(PATIENT_SEED, MEMBERS + 2 * CANDIDATES, CANDIDATES)}
    finally:
        torch.set_num_threads(threads)


def test_the_metrics_on_known_scores():
    assert membership.roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert membership.roc_auc([0, 1], [0, 1]) == 0.5
    assert membership.roc_auc([0], [1]) == 0.0
    others = np.arange(200.0)  # 1 % of 200: the two highest non-members may pass
    assert membership.tpr_at_fpr([196.5, 197.5, 250.0, 10.0], others) == 0.5  # above 197: 197.5 and 250


def test_both_attacks_find_the_members_of_an_overfit_model(overfit_world):
    w = overfit_world
    result = membership.membership_audit(w["target"], w["members"], w["non_members"], w["shadows"])
    assert set(result) == {"loss_threshold", "lira_offline"}
    for attack in result.values():
        assert attack["auc"] > 0.8, result
        assert attack["members"] == MEMBERS and attack["non_members"] == CANDIDATES
        assert 0.0 <= attack["tpr_at_1pct_fpr"] <= 1.0


def test_alike_members_and_non_members_give_chance(overfit_world):
    """Neither set was trained on: any AUC away from 0.5 would be the attack's own bias."""
    w = overfit_world
    result = membership.membership_audit(w["target"], w["unseen_a"], w["unseen_b"], w["shadows"])
    for attack in result.values():
        assert abs(attack["auc"] - 0.5) < 0.2, result
