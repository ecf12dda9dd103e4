"""SD3 / FLUX backends on tiny random-weight pipelines, entirely offline, on CPU."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import torch

torch.set_num_threads(1)

from diffusers import FluxPipeline  # noqa: E402

from privacy_firewall.backends.base import Conditioning  # noqa: E402
from privacy_firewall.backends.flux import (  # noqa: E402
    FluxBackend,
    FluxSettings,
    calculate_shift,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from privacy_firewall.backends.loading import ModelNotFoundError, offline_mode  # noqa: E402
from privacy_firewall.backends.sd3 import SD3Backend, SD3Settings  # noqa: E402
from privacy_firewall.backends.tiny import (  # noqa: E402
    build_random_flux_pipeline,
    build_random_sd3_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
)

KINDS = ["sd3", "flux"]
SEQ = 32  # T5 tokens: short, to keep the tests fast


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def no_network() -> Any:
    """Any attempt to open a connection fails loudly and is counted."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield attempts


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for kind, build in (("sd3", build_tiny_sd3_pipeline), ("flux", build_tiny_flux_pipeline)):
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        build().save_pretrained(folder)
        dirs[kind] = folder
    return dirs


BACKENDS = {"sd3": (SD3Backend, SD3Settings), "flux": (FluxBackend, FluxSettings)}


def _load(kind: str, folder: Path | str | None, **kw: Any) -> Any:
    """The pipeline the ``kind`` backend loads from ``folder`` (fp32 on the CPU
    unless ``kw`` says otherwise)."""
    cls, settings = BACKENDS[kind]
    return cls.load_pipeline(settings(model_path=None if folder is None else str(folder),
                                      **{"dtype": "fp32", "device": "cpu", **kw}))


def _backend(kind: str, pipe: Any) -> SD3Backend | FluxBackend:
    return SD3Backend(pipe, max_sequence_length=SEQ) if kind == "sd3" else FluxBackend(pipe, max_sequence_length=SEQ)


@pytest.fixture(scope="module")
def pipes(tiny_dirs: dict[str, Path]) -> dict[str, Any]:
    return {kind: _load(kind, tiny_dirs[kind]) for kind in KINDS}


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(kind: str, pipes: dict[str, Any]) -> SD3Backend | FluxBackend:
    return _backend(kind, pipes[kind])


def _latents(batch: int = 2, h: int = 8, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 16, h, w, generator=torch.Generator().manual_seed(seed))


# -- building and loading -------------------------------------------------------------
def test_tiny_pipelines_are_small_with_real_vae_factor(tiny_dirs: dict[str, Path], pipes: dict[str, Any]) -> None:
    for kind in KINDS:
        size = sum(p.stat().st_size for p in tiny_dirs[kind].rglob("*") if p.is_file())
        assert size < 2_000_000, f"{kind}: {size} bytes"
        assert pipes[kind].vae_scale_factor == 8
        assert pipes[kind].vae.config.latent_channels == 16
        assert not pipes[kind].transformer.training
    for built in (build_tiny_sd3_pipeline(), build_tiny_flux_pipeline()):
        assert not any(m.training for m in built.components.values() if isinstance(m, torch.nn.Module))


def test_load_pipeline_offline_restores_weights(kind: str, tiny_dirs: dict[str, Path], no_network: list) -> None:
    build = build_tiny_sd3_pipeline if kind == "sd3" else build_tiny_flux_pipeline
    original = build()
    env_before, const_before = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    loaded = _load(kind, tiny_dirs[kind])
    assert type(loaded) is type(original)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ref, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    assert os.environ.get("HF_HUB_OFFLINE") == env_before
    assert hf_constants.HF_HUB_OFFLINE == const_before
    assert no_network == []


def test_offline_mode_blocks_hub_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    # start from "online" (a conftest may already have set HF_HUB_OFFLINE=1)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    before = (os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE)
    with offline_mode():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hf_constants.HF_HUB_OFFLINE is True
    assert (os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE) == before


def test_missing_path_raises_model_not_found_with_instructions(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        _load("sd3", missing)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in msg
    assert "download" in msg and "--local-dir" in msg and "model_path=" in msg
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in msg


def test_unset_model_path_uses_default_repo_from_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelNotFoundError) as info:
        _load("flux", None)
    msg = str(info.value)
    assert "model_path is not set" in msg and "black-forest-labs/FLUX.1-dev" in msg
    assert str(tmp_path / "empty-hub") in msg


def test_uncached_repo_id_fails_without_network(no_network: list) -> None:
    repo = "no-such-org-xyz/no-such-model-xyz"
    with pytest.raises(ModelNotFoundError) as info:
        _load("flux", repo)
    assert repo in str(info.value) and "cache" in str(info.value)
    assert no_network == []


def test_repo_id_resolves_from_offline_cache(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list
) -> None:
    """A repo id is served from a populated Hugging Face cache, without network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--someorg--tiny-flux"
    shutil.copytree(tiny_dirs["flux"], repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = _load("flux", "someorg/tiny-flux")
    assert isinstance(pipe, FluxPipeline)
    assert no_network == []


def test_incomplete_or_wrong_folder_raises(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "sd3"
    shutil.copytree(tiny_dirs["sd3"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelNotFoundError, match="transformer"):
        _load("sd3", broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        _load("sd3", broken)
    with pytest.raises(ModelNotFoundError, match="FluxPipeline"):
        _load("sd3", tiny_dirs["flux"])


def test_loading_flags_and_from_settings(tiny_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg = SD3Settings(model_path=str(tiny_dirs["sd3"]), dtype="bf16", device="cpu", working_size=64,
                      drop_t5=False, vae_tiling=True, vae_slicing=True, cpu_offload=True, max_sequence_length=32)
    with caplog.at_level(logging.WARNING, logger="privacy_firewall.backends.loading"):
        backend = SD3Backend.from_settings(cfg)
    assert torch.cuda.is_available() or "cpu_offload ignored" in caplog.text
    assert backend.pipe.vae.use_tiling and backend.pipe.vae.use_slicing
    assert backend.dtype == torch.bfloat16 and backend.device == torch.device("cpu")
    z = _latents(1)
    v = backend.velocity(z, 0.7, backend.encode_prompts(["skin"]))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()

    flux_cfg = FluxSettings(model_path=str(tiny_dirs["flux"]), dtype="fp32", device="cpu", working_size=64,
                            max_sequence_length=32)
    flux = FluxBackend.from_settings(flux_cfg)
    assert flux.pipe.text_encoder_2 is not None  # FLUX cannot drop T5
    assert not flux.pipe.vae.use_tiling


def test_load_backend_by_name_types_the_settings(tiny_dirs: dict[str, Path]) -> None:
    """load_backend finds the backend by name; settings built as the shared base
    get that backend's own defaults."""
    from privacy_firewall.backends import BackendSettings, load_backend

    backend = load_backend(BackendSettings(name="flux", model_path=str(tiny_dirs["flux"]), dtype="fp32",
                                           device="cpu"))
    assert isinstance(backend, FluxBackend) and backend.max_sequence_length == 512  # FluxSettings' default
    assert backend.dtype == torch.float32


def test_random_weights_through_the_backend_class(kind: str) -> None:
    """The random-weight architectures are the backend's own facts: tiny ones are
    built on the CPU (and cast), full-size ones on the meta device allocate nothing."""
    from privacy_firewall.settings import ConfigError

    cls, settings = BACKENDS[kind]
    tiny, full = (f"tiny-{kind}", "sd3-medium" if kind == "sd3" else "flux-dev")
    assert not cls.random_architectures[tiny].full_size and cls.random_architectures[full].full_size
    backend = cls.random_weights(tiny, settings(device="cpu", vae_tiling=True), dtype=torch.bfloat16, device="cpu")
    assert type(backend) is cls and backend.dtype == torch.bfloat16 and backend.pipe.vae.use_tiling
    v = backend.velocity(_latents(1), 0.5, backend.encode_prompts(["a face"]))
    assert v.shape == (1, 16, 8, 6) and torch.isfinite(v).all()
    meta = cls.random_pipeline(full, dtype=torch.bfloat16, device="meta")
    assert meta.transformer.device.type == "meta"
    with pytest.raises(ConfigError, match=tiny):
        cls.random_weights("no-such-architecture", settings(), dtype=torch.float32, device="cpu")


def test_sd3_drop_t5_loads_without_t5_weights_and_runs(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "sd3-no-t5"
    shutil.copytree(tiny_dirs["sd3"], folder)
    shutil.rmtree(folder / "text_encoder_3")
    with pytest.raises(ModelNotFoundError, match="text_encoder_3"):
        _load("sd3", folder)
    pipe = _load("sd3", folder, drop_t5=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    backend = SD3Backend(pipe, max_sequence_length=SEQ)
    cond = backend.encode_prompts(["a face", "a face with erythema"])
    assert cond.embeds.shape == (2, 77 + SEQ, pipe.transformer.config.joint_attention_dim)
    assert torch.count_nonzero(cond.embeds[:, 77:]) == 0  # T5 slot is zeros
    assert torch.count_nonzero(cond.embeds[:, :77]) > 0
    v = backend.velocity(_latents(2), 0.5, cond)
    assert v.shape == (2, 16, 8, 6) and torch.isfinite(v).all()


# -- prompts ----------------------------------------------------------------------------
def test_prompts_encoded_once_per_backend(kind: str, pipes: dict[str, Any]) -> None:
    pipe = pipes[kind]
    backend = _backend(kind, pipe)
    names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
    calls = dict.fromkeys(names, 0)
    hooks = [getattr(pipe, n).register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in names]
    try:
        first = backend.encode_prompts(["a face", "a red cheek", "a face"])
        assert all(c == 1 for c in calls.values()), calls  # one batched call per encoder
        second = backend.encode_prompts(["a red cheek", "a face"])
        assert all(c == 1 for c in calls.values()), calls  # all cached
        backend.encode_prompts(["a new prompt", "a face"])
        assert all(c == 2 for c in calls.values()), calls  # only the new prompt is encoded
    finally:
        for h in hooks:
            h.remove()
    assert len(first) == 3 and set(first.extras) == {"pooled"}
    assert torch.equal(first.embeds[0], first.embeds[2])
    assert torch.equal(second.embeds[0], first.embeds[1])
    assert torch.equal(second.extras["pooled"][1], first.extras["pooled"][0])
    assert not torch.equal(first.embeds[0], first.embeds[1])  # prompts matter


# -- the model ----------------------------------------------------------------------------
def test_velocity_shape_deterministic_and_sensitive(backend: SD3Backend | FluxBackend) -> None:
    z = _latents(2)
    cond = backend.encode_prompts(["a face", "a face with erythema"])
    v1 = backend.velocity(z, 0.6, cond)
    v2 = backend.velocity(z.clone(), 0.6, cond)
    assert v1.shape == z.shape and v1.dtype == z.dtype
    assert torch.equal(v1, v2)
    # rows are independent: evaluating one latent alone gives the same velocity
    v_row = backend.velocity(z[1:], 0.6, cond.index([1]))
    torch.testing.assert_close(v_row[0], v1[1], atol=1e-5, rtol=1e-5)
    # the output depends on t, the prompt and the latent
    assert not torch.allclose(backend.velocity(z, 0.2, cond), v1)
    assert not torch.allclose(backend.velocity(z, 0.6, cond.index([1, 0])), v1)
    assert not torch.allclose(backend.velocity(z + 1.0, 0.6, cond), v1)
    with pytest.raises(ValueError):
        backend.velocity(z, 0.6, cond.index([0]))


def test_nfe_counts_latents(backend: SD3Backend | FluxBackend) -> None:
    cond = backend.encode_prompts(["a"] * 3)
    assert backend.nfe == 0
    backend.velocity(_latents(3), 0.5, cond)
    assert backend.nfe == 3
    backend.velocity(_latents(1), 0.5, cond.index([0]))
    assert backend.nfe == 4


def test_backend_euler_matches_pipeline_sampling(kind: str, pipes: dict[str, Any]) -> None:
    """Euler integration with the backend's schedule and velocity reproduces the
    diffusers pipeline's own sampling loop (timestep scaling, guidance, packing)."""
    pipe, backend = pipes[kind], _backend(kind, pipes[kind])
    steps, z0 = 4, _latents(1, 8, 8, seed=3)
    if kind == "sd3":
        ref = pipe(
            "a face",
            num_inference_steps=steps,
            guidance_scale=1.0,
            latents=z0.clone(),
            height=64,
            width=64,
            output_type="latent",
            max_sequence_length=SEQ,
        ).images
        guidance = None
    else:
        ref = pipe(
            "a face",
            num_inference_steps=steps,
            guidance_scale=3.5,
            latents=pack_latents(z0),
            height=64,
            width=64,
            output_type="latent",
            max_sequence_length=SEQ,
        ).images
        ref = unpack_latents(ref, 8, 8)
        guidance = torch.tensor([3.5])
    ts = backend.timesteps(steps, (64, 64))
    cond = backend.encode_prompts(["a face"])
    z = z0.clone()
    for i in range(steps):
        z = z + (ts[i + 1] - ts[i]) * backend.velocity(z, float(ts[i]), cond, guidance)
    assert not torch.allclose(z, z0, atol=1e-3)
    torch.testing.assert_close(z, ref, atol=1e-4, rtol=1e-4)


def test_sd3_true_cfg_matches_pipeline(pipes: dict[str, Any]) -> None:
    """FlowEdit's CFG, v("") + s (v(prompt) - v("")), is the pipeline's own
    classifier-free guidance with an empty negative prompt."""
    pipe, backend = pipes["sd3"], _backend("sd3", pipes["sd3"])
    steps, scale, z0 = 3, 4.0, _latents(1, 8, 8, seed=5)
    ref = pipe(
        "a face",
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=scale,
        latents=z0.clone(),
        height=64,
        width=64,
        output_type="latent",
        max_sequence_length=SEQ,
    ).images
    ts = backend.timesteps(steps, (64, 64))
    cond = backend.encode_prompts(["", "a face"])
    z = z0.clone()
    for i in range(steps):
        u, c = backend.velocity(torch.cat([z, z]), float(ts[i]), cond).chunk(2)
        z = z + (ts[i + 1] - ts[i]) * (u + scale * (c - u))
    torch.testing.assert_close(z, ref, atol=1e-4, rtol=1e-4)


def test_flux_guidance_input() -> None:
    pipe = build_tiny_flux_pipeline()
    backend = FluxBackend(pipe, max_sequence_length=SEQ)
    assert backend.has_true_cfg is False
    z, cond = _latents(2), backend.encode_prompts(["a", "b"])
    v_default = backend.velocity(z, 0.5, cond)
    torch.testing.assert_close(backend.velocity(z, 0.5, cond, torch.tensor([1.0, 1.0])), v_default)
    v_g = backend.velocity(z, 0.5, cond, torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(v_g[0], v_default[0])
    assert not torch.allclose(v_g[1], v_default[1])
    plain = FluxBackend(build_tiny_flux_pipeline(guidance_embeds=False), max_sequence_length=SEQ)
    assert plain.has_true_cfg is True
    c2 = plain.encode_prompts(["a", "b"])
    torch.testing.assert_close(plain.velocity(z, 0.5, c2, torch.tensor([1.0, 4.0])), plain.velocity(z, 0.5, c2))


def test_flux_packing_is_exact_inverse_and_matches_pipeline() -> None:
    z = _latents(2, 10, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 5 * 3, 64)
    assert torch.equal(unpack_latents(packed, 10, 6), z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 10, 6))
    tokens = torch.randn(3, 5 * 3, 64)
    assert torch.equal(pack_latents(unpack_latents(tokens, 10, 6)), tokens)
    ids = latent_image_ids(10, 6, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 5, 3, "cpu", torch.float32))
    with pytest.raises(ValueError):
        pack_latents(_latents(1, 7, 6))


# -- image <-> latent ------------------------------------------------------------------------
def test_encode_decode_shapes_ranges_and_normalisation(backend: SD3Backend | FluxBackend) -> None:
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    z = backend.encode_images(images)
    assert z.shape == (2, 16, 8, 6) and z.dtype == torch.float32
    vae = backend.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    with torch.no_grad():
        raw = vae.encode(images * 2 - 1).latent_dist.mode()
        torch.testing.assert_close(z, (raw - shift) * scale)
        out = backend.decode_latents(z)
        ref = ((vae.decode(z / scale + shift).sample + 1) / 2).clamp(0, 1)
    assert out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    torch.testing.assert_close(out, ref)
    assert not torch.equal(backend.encode_images(images.flip(-1)), z)


# -- schedule ----------------------------------------------------------------------------------
def test_timesteps_decrease_from_one_to_zero(backend: SD3Backend | FluxBackend) -> None:
    for n in (1, 10, 50):
        ts = backend.timesteps(n, (512, 512))
        assert ts.shape == (n + 1,) and ts.dtype == torch.float32 and ts.device.type == "cpu"
        assert abs(float(ts[0]) - 1.0) < 1e-3
        assert float(ts[-1]) == 0.0
        assert bool((ts[1:] < ts[:-1]).all())
    assert backend.size_multiple == 16


def test_flux_shift_grows_with_resolution(pipes: dict[str, Any]) -> None:
    backend = FluxBackend(pipes["flux"])
    small, large = backend.timesteps(20, (256, 256)), backend.timesteps(20, (1024, 1024))
    assert bool((large[1:-1] > small[1:-1]).all())
    assert backend.image_seq_len((1024, 1024)) == 4096
    assert calculate_shift(4096) == pytest.approx(1.15) and calculate_shift(256) == pytest.approx(0.5)


def test_sd3_schedule_is_resolution_independent(pipes: dict[str, Any]) -> None:
    backend = SD3Backend(pipes["sd3"])
    torch.testing.assert_close(backend.timesteps(28, (256, 256)), backend.timesteps(28, (1024, 1024)))
    shift = 3.0
    ts = backend.timesteps(28, (512, 512))
    # static shift: sigma = s * u / (1 + (s - 1) u) on a uniform grid u
    u = ts[:-1] / (shift - (shift - 1) * ts[:-1])
    steps = u[:-1] - u[1:]
    torch.testing.assert_close(steps, steps[0].expand_as(steps), atol=1e-5, rtol=0)


# -- real-size builders (on the meta device: nothing is allocated) ----------------------------
def test_random_builders_have_real_transformer_sizes() -> None:
    sd3 = build_random_sd3_pipeline("sd3-medium", device="meta")
    cfg = sd3.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size) == (24, 24, 64, 2)
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.caption_projection_dim) == (4096, 2048, 1536)
    assert sd3.transformer.device.type == "meta"
    assert sum(p.numel() for p in sd3.transformer.parameters()) == 2_028_328_000
    assert sd3.vae_scale_factor == 8

    flux = build_random_flux_pipeline("flux-dev", device="meta")
    cfg = flux.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (19, 38, 24, 128)
    assert (cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (64, 4096, 768)
    assert cfg.guidance_embeds and tuple(cfg.axes_dims_rope) == (16, 56, 56)
    assert abs(sum(p.numel() for p in flux.transformer.parameters()) - 11.9e9) < 0.05e9
    # small text encoders still produce the widths the transformers expect
    assert flux.text_encoder.config.hidden_size == cfg.pooled_projection_dim
    assert flux.text_encoder_2.config.d_model == cfg.joint_attention_dim
    assert torch.get_default_dtype() == torch.float32  # the builder restored it


def test_conditioning_rows_line_up(backend: SD3Backend | FluxBackend) -> None:
    cond = backend.encode_prompts(["x", "y"])
    assert isinstance(cond, Conditioning)
    picked = cond.index([1, 1, 0])
    assert torch.equal(picked.embeds[0], cond.embeds[1]) and torch.equal(
        picked.extras["pooled"][2], cond.extras["pooled"][0]
    )


def test_saved_model_index_names_pipeline(tiny_dirs: dict[str, Path]) -> None:
    assert json.loads((tiny_dirs["sd3"] / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert json.loads((tiny_dirs["flux"] / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
