"""The re-identification instruments: planted cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from audit.reidentification import (
    AttackResult,
    LearnedMatcherAttack,
    attribute_retention,
    chance_agreement,
    mask_iou_attack,
    mask_iou_distances,
    one_at_a_time,
    pixel_attack,
    rank_gallery,
    ranks_from_distances,
    reid_gallery_figure,
    reid_rates,
    replay_attack,
    retained_above_chance,
)


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_identical_query_and_gallery_is_always_found():
    emb = np.random.default_rng(0).normal(size=(20, 8))
    rates = reid_rates(emb, emb)
    assert rates["top1"] == 1.0 and rates["top5"] == 1.0
    assert rates["chance"] == pytest.approx(1 / 20)
    assert rates["chance_top5"] == pytest.approx(5 / 20)
    assert np.all(rank_gallery(emb, emb).rank == 0)


def test_unrelated_queries_score_about_chance():
    rng = np.random.default_rng(1)
    top1 = [reid_rates(rng.normal(size=(50, 8)), rng.normal(size=(50, 8)))["top1"] for _ in range(40)]
    assert np.mean(top1) == pytest.approx(1 / 50, abs=0.01)


def test_true_index_points_into_a_larger_gallery():
    gallery = np.random.default_rng(2).normal(size=(30, 4))
    true = np.array([3, 17, 29])
    rates = reid_rates(gallery[true] + 1e-6, gallery, true_index=true)
    assert rates["top1"] == 1.0 and rates["n_gallery"] == 30 and rates["n_query"] == 3
    with pytest.raises(ValueError):
        reid_rates(gallery[:3], gallery, true_index=[0, 1, 30])


def test_ties_score_chance_not_a_win_or_a_loss():
    # Every surrogate identical: the attacker can only guess.
    ranks = ranks_from_distances(np.zeros((10, 10)))
    assert ranks.top_k_rate(1) == pytest.approx(0.1)
    assert ranks.top_k_rate(5) == pytest.approx(0.5)
    # The true entry tied with one other, nothing closer: top-1 half the time.
    d = np.array([[0.0, 0.0, 1.0], [2.0, 1.0, 0.5]])
    r = ranks_from_distances(d)
    assert r.top_k_rate(1) == pytest.approx((0.5 + 0.0) / 2)
    assert list(r.closer) == [0, 1] and list(r.tied) == [1, 0]


def test_pixel_attack_finds_noisy_copies_and_cosine_ignores_brightness():
    gallery = random_images(12)
    rng = np.random.default_rng(3)
    noisy = np.clip(gallery.astype(int) + rng.integers(-10, 11, gallery.shape), 0, 255).astype(np.uint8)
    result = pixel_attack(noisy, gallery)
    assert result.top1 == 1.0 and list(result.best_match) == list(range(12))
    darker = (gallery.astype(np.float32) * 0.6).astype(np.uint8)
    assert pixel_attack(darker, gallery, metric="cosine").top1 == 1.0
    assert set(result.metrics()) >= {"reid_top1_pixel", "reid_top5_pixel", "reid_chance"}


def test_pixel_attack_on_unrelated_images_is_near_chance():
    top1 = [pixel_attack(random_images(20, seed=s), random_images(20, seed=100 + s)).top1 for s in range(20)]
    assert np.mean(top1) < 0.15


def test_mask_iou_distances_and_attack():
    masks = np.zeros((4, 8, 8), bool)
    masks[0, :4, :4] = True
    masks[1, 4:, 4:] = True
    masks[2, :4, 4:] = True
    masks[3, 4:, :4] = True
    d = mask_iou_distances(masks, masks)
    assert np.allclose(np.diag(d), 0) and np.allclose(d[~np.eye(4, dtype=bool)], 1)
    shrunk = masks.copy()
    shrunk[:, 3, :] = shrunk[:, 4, :] = False  # each query loses a row of pixels: still nearest its own
    assert mask_iou_attack(shrunk, masks).top1 == 1.0
    empty = np.zeros((2, 8, 8), bool)
    assert np.all(mask_iou_distances(empty, empty) == 1.0)  # no evidence: all tied
    assert mask_iou_attack(empty, empty).top1 == pytest.approx(0.5)


def test_replay_attack_breaks_a_public_seed_and_not_a_secret_one():
    gallery = list(random_images(10, seed=4))

    def firewall(photo: np.ndarray, key: object) -> np.ndarray:
        # A stand-in firewall: deterministic in (photo, key), output unrelated to the photo's pixels.
        seed = abs(hash((photo.tobytes(), str(key)))) % 2**32
        return np.random.default_rng(seed).integers(0, 256, photo.shape, dtype=np.uint8)

    observed = [firewall(p, "public-seed-0") for p in gallery]
    broken = replay_attack(observed, gallery, one_at_a_time(firewall), guesses=["public-seed-0"])
    assert broken.top1 == 1.0 and broken.extra["exact_replays"] == 10
    secret = [firewall(p, "hospital-secret") for p in gallery]
    held = replay_attack(secret, gallery, one_at_a_time(firewall), guesses=["public-seed-0", 1, 2])
    assert held.extra["exact_replays"] == 0 and held.top1 < 0.5


def test_replay_attack_ignores_refused_replays():
    gallery = list(random_images(4, seed=5))
    result = replay_attack(gallery, gallery, lambda photos, g: [p if i % 2 == 0 else None for i, p in enumerate(photos)])
    # Entries 0 and 2 are replayed exactly; 1 and 3 are never candidates (distance inf for all: all tied).
    assert result.rank[0] == 0 and result.rank[2] == 0


def test_chance_agreement_formula():
    src = ["a", "a", "b", "b"]
    sur = ["a", "a", "a", "b"]
    # p_src = (0.5, 0.5), p_sur = (0.75, 0.25): 0.5*0.75 + 0.5*0.25
    assert chance_agreement(src, sur) == pytest.approx(0.5)
    assert chance_agreement(["x"] * 5, ["x"] * 5) == pytest.approx(1.0)
    assert chance_agreement(["x"] * 5, ["y"] * 5) == 0.0


def test_attribute_retention_kept_and_chance():
    rng = np.random.default_rng(6)
    src = rng.choice(["black", "brown", "blond"], size=3000)
    kept = {"hair": src, "sex": rng.choice(["f", "m"], size=3000)}
    surrogate = {"hair": src.copy(), "sex": rng.choice(["f", "m"], size=3000)}
    r = attribute_retention(kept, surrogate)
    assert r["hair"]["kept"] == 1.0 and r["hair"]["chance"] == pytest.approx(1 / 3, abs=0.02)
    assert r["sex"]["kept"] == pytest.approx(0.5, abs=0.03) and r["sex"]["excess"] == pytest.approx(0, abs=0.03)
    assert retained_above_chance(r) == ["hair"]
    assert retained_above_chance(r, exempt=("hair",)) == []
    only = attribute_retention(kept, surrogate, include=np.arange(3000) < 10)
    assert only["hair"]["n"] == 10


def test_learned_matcher_attack_learns_a_fixed_transformation():
    # The "firewall" is a fixed colour transform plus noise: a learned matcher must see through it.
    rng = np.random.default_rng(7)

    def surrogate_of(photos: np.ndarray) -> np.ndarray:
        out = 255 - photos[..., ::-1].astype(int) + rng.integers(-8, 9, photos.shape)
        return np.clip(out, 0, 255).astype(np.uint8)

    smooth = lambda n, s: np.repeat(np.repeat(random_images(n, 4, s), 4, 1), 4, 2)  # noqa: E731  (blocky images)
    train = smooth(96, 8)
    test = smooth(16, 9)
    from models.identity_matcher import IdentityEmbedderConfig, TrainSettings

    attack = LearnedMatcherAttack(IdentityEmbedderConfig(width=4, embed_dim=16, image_size=16),
                                  TrainSettings(steps=60, batch_size=32, learning_rate=5e-3))
    attack.fit(train, surrogate_of(train), progress=False)
    result = attack.attack(surrogate_of(test), test)
    assert isinstance(result, AttackResult) and result.train_seconds is not None
    assert result.top1 > 3 / 16  # well above chance (1/16)


def test_learned_mask_attack_sees_through_a_fixed_transformation_of_masks():
    """The mask-only attacker: a surrogate's mask is the patient's mask mirrored
    with specks; a matcher trained on such pairs links held-out ones."""
    from models.identity_matcher import IdentityEmbedderConfig, TrainSettings

    rng = np.random.default_rng(8)

    def blocky_masks(n: int) -> np.ndarray:
        return np.repeat(np.repeat(rng.random((n, 4, 4)) > 0.5, 4, 1), 4, 2)

    def surrogate_mask(masks: np.ndarray) -> np.ndarray:
        return masks[:, :, ::-1] ^ (rng.random(masks.shape) > 0.95)

    train, test = blocky_masks(96), blocky_masks(16)
    attack = LearnedMatcherAttack(IdentityEmbedderConfig(in_channels=1, width=4, embed_dim=16, image_size=16),
                                  TrainSettings(steps=60, batch_size=32, learning_rate=5e-3))
    result = attack.fit(train, surrogate_mask(train), progress=False).attack(surrogate_mask(test), test,
                                                                             name="mask_learned")
    assert result.metrics()["reid_top1_mask_learned"] == result.top1
    assert result.top1 > 3 / 16  # well above chance (1/16)


def frame_colours(path) -> tuple[int, int]:
    """Pixels of the figure in matplotlib's tab:green and tab:red (the frames)."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return int((rgb == (44, 160, 44)).all(1).sum()), int((rgb == (214, 39, 40)).all(1).sum())


def test_gallery_figure_frames_right_guesses_green_and_wrong_ones_red(tmp_path):
    from PIL import Image

    gallery = random_images(6)
    right = pixel_attack(gallery, gallery)  # each surrogate is its own source
    wrong = pixel_attack(gallery[::-1], gallery)  # each is another person's photo
    assert right.top1 == 1.0 and wrong.top1 == 0.0
    green, red = frame_colours(reid_gallery_figure(tmp_path / "right.png", gallery, gallery, gallery, [right], rows=3))
    assert green > 0 and red == 0
    path = reid_gallery_figure(tmp_path / "wrong.png", gallery, gallery[::-1], gallery, [wrong], rows=3)
    green, red = frame_colours(path)
    assert green == 0 and red > 0
    # One row per subject asked for, and no metadata (no software or dates in the file).
    taller = reid_gallery_figure(tmp_path / "six.png", gallery, gallery, gallery, [right], rows=6)
    assert Image.open(taller).height > 1.8 * Image.open(path).height
    assert "Software" not in Image.open(path).info
