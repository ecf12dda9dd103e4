"""FlowEdit properties, on a random-weight embedded model (fast, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from privacy_firewall.flowedit import FlowEditSettings, flowedit

SRC = "photo of a woman with facial erythema"
TGT = "photo of a man with facial erythema"
HEALTHY = "photo of a man with clear, healthy skin"
SETTINGS = FlowEditSettings(steps=10, n_max=7, n_min=0, n_avg=1, source_guidance=2.0, target_guidance=5.0,
                            guidance_mode="cfg", mixed_source_guidance=1.5)


@pytest.fixture()
def source(tiny_embedded_backend):
    torch.manual_seed(1)
    return tiny_embedded_backend.encode_images(torch.rand(3, 3, 16, 16))


def run(backend, x, targets, settings=SETTINGS, seeds=(1, 2, 3)):
    b = x.shape[0]
    return flowedit(backend, x, [SRC] * b, [list(targets)] * b, settings, list(seeds)[:b])


def test_same_prompt_leaves_the_source_unchanged(tiny_embedded_backend, source):
    same = dataclasses.replace(SETTINGS, target_guidance=SETTINGS.source_guidance)
    out = run(tiny_embedded_backend, source, [SRC], same).latents[:, 0]
    assert torch.equal(out, source)


def test_edit_changes_the_source(tiny_embedded_backend, source):
    out = run(tiny_embedded_backend, source, [TGT]).latents[:, 0]
    assert (out - source).abs().mean() > 1e-3


def test_n_max_zero_leaves_the_source_unchanged(tiny_embedded_backend, source):
    out = run(tiny_embedded_backend, source, [TGT], dataclasses.replace(SETTINGS, n_max=0))
    assert torch.equal(out.latents[:, 0], source)
    assert out.nfe_per_image == 0


def test_mixed_guidance_without_source_term_equals_cfg(tiny_embedded_backend, source):
    cfg = run(tiny_embedded_backend, source, [TGT]).latents
    mixed = run(
        tiny_embedded_backend, source, [TGT],
        dataclasses.replace(SETTINGS, guidance_mode="mixed", mixed_source_guidance=0.0),
    ).latents
    assert torch.allclose(cfg, mixed, atol=1e-6)
    anchored = run(
        tiny_embedded_backend, source, [TGT],
        dataclasses.replace(SETTINGS, guidance_mode="mixed", mixed_source_guidance=1.5),
    )
    assert not torch.allclose(cfg, anchored.latents, atol=1e-4)
    # eq. (1) costs one more evaluation per target and step: 2 + 3k.
    assert anchored.nfe_per_image == SETTINGS.n_max * (2 + 3)


def test_shared_source_branch_equals_separate_runs_with_fewer_nfe(tiny_embedded_backend, source):
    twins = run(tiny_embedded_backend, source, [TGT, HEALTHY])
    alone_tgt = run(tiny_embedded_backend, source, [TGT])
    alone_healthy = run(tiny_embedded_backend, source, [HEALTHY])
    assert torch.allclose(twins.latents[:, 0], alone_tgt.latents[:, 0], atol=1e-5)
    assert torch.allclose(twins.latents[:, 1], alone_healthy.latents[:, 0], atol=1e-5)
    assert twins.nfe_per_image == SETTINGS.n_max * (2 + 2 * 2)
    assert alone_tgt.nfe_per_image + alone_healthy.nfe_per_image == SETTINGS.n_max * 4 * 2
    assert twins.nfe_per_image < alone_tgt.nfe_per_image + alone_healthy.nfe_per_image


def test_seed_determines_the_result(tiny_embedded_backend, source):
    a = run(tiny_embedded_backend, source, [TGT], seeds=(5, 6, 7)).latents
    b = run(tiny_embedded_backend, source, [TGT], seeds=(5, 6, 7)).latents
    c = run(tiny_embedded_backend, source, [TGT], seeds=(8, 6, 7)).latents
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], c[0])
    # An image's result does not depend on the other images in its batch.
    assert torch.allclose(a[1:], c[1:], atol=1e-5)
    single = flowedit(tiny_embedded_backend, source[1:2], [SRC], [[TGT]], SETTINGS, [6]).latents
    assert torch.allclose(single[0], a[1], atol=1e-5)


def test_n_min_switches_to_plain_sampling(tiny_embedded_backend, source):
    plain = run(tiny_embedded_backend, source, [TGT])
    with_n_min = run(tiny_embedded_backend, source, [TGT], dataclasses.replace(SETTINGS, n_min=3))
    assert torch.isfinite(with_n_min.latents).all()
    assert not torch.allclose(plain.latents, with_n_min.latents, atol=1e-4)
    # Plain sampling needs no source branch: 4 NFE per edit step, 2 per sampling step.
    assert with_n_min.nfe_per_image == (SETTINGS.n_max - 3) * 4 + 3 * 2


def test_prompts_are_encoded_once(tiny_embedded_backend, source, monkeypatch):
    calls = []
    original = type(tiny_embedded_backend)._encode_prompts

    def counting(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(type(tiny_embedded_backend), "_encode_prompts", counting)
    tiny_embedded_backend._prompt_cache.clear()
    run(tiny_embedded_backend, source, [TGT, HEALTHY])
    run(tiny_embedded_backend, source, [TGT, HEALTHY])
    encoded = [p for c in calls for p in c]
    assert sorted(encoded) == sorted({"", SRC, TGT, HEALTHY})


def test_bad_settings_are_refused(tiny_embedded_backend, source):
    with pytest.raises(ValueError, match="n_max"):
        run(tiny_embedded_backend, source, [TGT], dataclasses.replace(SETTINGS, n_max=11))
    with pytest.raises(ValueError, match="guidance_mode"):
        run(tiny_embedded_backend, source, [TGT], dataclasses.replace(SETTINGS, guidance_mode="x"))


def test_prompt_cache_is_bounded_and_exact(tiny_embedded_backend):
    """Every photo's new identity is its own prompt: the cache must not grow
    without end, and what it returns must equal a fresh encoding."""
    backend = tiny_embedded_backend
    old_size, backend.prompt_cache_size = backend.prompt_cache_size, 3
    try:
        prompts = [f"photo of a woman with facial erythema, {c} hair" for c in ("black", "brown", "blond", "red", "gray")]
        first = backend.encode_prompts(prompts)
        assert len(backend._prompt_cache) == 3
        again = backend.encode_prompts(prompts[::-1])
        assert torch.equal(again.embeds, first.embeds.flip(0))
        assert len(backend._prompt_cache) == 3
    finally:
        backend.prompt_cache_size = old_size
