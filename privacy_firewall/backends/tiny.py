"""Random-weight SD3 and FLUX pipelines built from configs, entirely offline.

Two families of builders:

* ``build_tiny_sd3_pipeline`` / ``build_tiny_flux_pipeline``: about 1 MB of
  weights, for tests. Every component is real diffusers/transformers code (the
  same classes the pretrained pipelines use) with tiny widths and depths; the VAE
  keeps the real 8x downscale factor (four encoder blocks) and the real latent
  channel count (16), so latent shapes match the pretrained models.
* ``build_random_sd3_pipeline`` / ``build_random_flux_pipeline``: the transformer
  has the real architecture (SD3-medium, SD3.5, FLUX.1-dev/schnell) with random
  weights, for speed and memory measurements without the pretrained weights. The
  VAE uses the real config too. Text encoders are small by default
  (``text_encoders="small"``): they produce embeddings of the real widths
  (``joint_attention_dim`` 4096, the real pooled widths) from a couple of narrow
  layers, because the real CLIP-G and T5-XXL encoders (0.7 B and 4.7 B
  parameters) are irrelevant to the transformer's cost and too large to build on
  a CPU machine; ``text_encoders="real"`` builds the real sizes anyway.

Tokenizers are byte-level stand-ins (no vocabulary files are needed): a CLIP BPE
over the 256 byte symbols and a T5 unigram over printable ASCII characters. They
tokenize any prompt deterministically, but the ids mean nothing to a pretrained
encoder: these pipelines are for plumbing, timing and memory, never for images.

Pass ``device="meta"`` to a ``build_random_*`` builder to get the module
structure (parameter counts, configs) without allocating any weights.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5TokenizerFast

# diffusers and transformers are imported where a builder runs: the backend
# registry imports every module of this package, and they take seconds.

__all__ = [
    "FLUX_ARCHITECTURES",
    "SD3_ARCHITECTURES",
    "build_random_flux_pipeline",
    "build_random_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_sd3_pipeline",
    "byte_level_clip_tokenizer",
    "char_level_t5_tokenizer",
]

CLIP_MAX_LENGTH = 77

# -- transformer architectures (the configs of the pretrained checkpoints) --------
SD3_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers
    "sd3-medium": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    },
    # stabilityai/stable-diffusion-3.5-medium
    "sd3.5-medium": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    },
    # stabilityai/stable-diffusion-3.5-large
    "sd3.5-large": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 38,
        "attention_head_dim": 64,
        "num_attention_heads": 38,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    },
}

FLUX_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-dev (guidance-distilled)
    "flux-dev": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
    # black-forest-labs/FLUX.1-schnell (timestep-distilled, no guidance input)
    "flux-schnell": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    },
}

# The real VAE (SD3 and FLUX share the architecture; only the latent statistics differ).
_REAL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
# Four blocks -> 2**3 = 8x downscale, like the real VAE, at a few kB.
_TINY_VAE: dict[str, Any] = {
    **_REAL_VAE,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 128,
}
_SD3_LATENT_STATS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
_FLUX_LATENT_STATS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}

# Real text-encoder sizes (CLIP ViT-L/14, OpenCLIP ViT-bigG/14, T5 v1.1 XXL).
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}


# -- tokenizers ----------------------------------------------------------------------
def byte_level_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the 256 byte-level symbols (no merges).

    Ids 0..511 are the byte symbols (bare, then with ``</w>``); 512 is
    ``<|startoftext|>`` and 513 ``<|endoftext|>`` (also the pad token), so the
    matching text encoder has ``vocab_size=514``, ``bos_token_id=512`` and
    ``eos_token_id=513``.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for sym in alphabet:
        vocab[sym] = len(vocab)
    for sym in alphabet:
        vocab[sym + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def char_level_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 unigram tokenizer over printable ASCII characters (ids 0-2 are
    ``<pad>``, ``</s>``, ``<unk>``); ``vocab_size`` of the encoder must be at least
    ``len(tokenizer)``."""
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars]
    pieces += [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# -- helpers ----------------------------------------------------------------------
@contextmanager
def _build_context(seed: int, dtype: torch.dtype, device: str | torch.device) -> Iterator[None]:
    """Seed the RNG (without disturbing the caller's), allocate directly on
    ``device`` and in ``dtype``."""
    old_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old_dtype)


def _clip_config(size: dict[str, Any], vocab_size: int) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **size,
    )


def _t5_config(size: dict[str, Any], vocab_size: int) -> T5Config:
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        num_decoder_layers=0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **size,
    )


def _finish(pipe: Any) -> Any:
    """Models built from configs are in train mode: switch them to eval."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
            module.requires_grad_(False)
    return pipe


def _sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _sd3_pipeline(
    transformer_cfg: dict[str, Any],
    vae_cfg: dict[str, Any],
    clip_sizes: tuple[dict[str, Any], dict[str, Any]],
    t5_size: dict[str, Any],
    clip_vocab: int,
    t5_vocab: int,
    t5_max_length: int,
) -> StableDiffusion3Pipeline:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_tok = byte_level_clip_tokenizer()
    t5_tok = char_level_t5_tokenizer(t5_max_length)
    return _finish(
        StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**transformer_cfg),
            scheduler=_sd3_scheduler(),
            vae=AutoencoderKL(**vae_cfg, **_SD3_LATENT_STATS),
            text_encoder=CLIPTextModelWithProjection(_clip_config(clip_sizes[0], clip_vocab)),
            tokenizer=clip_tok,
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_sizes[1], clip_vocab)),
            tokenizer_2=byte_level_clip_tokenizer(),
            text_encoder_3=T5EncoderModel(_t5_config(t5_size, t5_vocab)),
            tokenizer_3=t5_tok,
        )
    )


def _flux_pipeline(
    transformer_cfg: dict[str, Any],
    vae_cfg: dict[str, Any],
    clip_size: dict[str, Any],
    t5_size: dict[str, Any],
    clip_vocab: int,
    t5_vocab: int,
    t5_max_length: int,
) -> FluxPipeline:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    return _finish(
        FluxPipeline(
            transformer=FluxTransformer2DModel(**transformer_cfg),
            scheduler=_flux_scheduler(),
            vae=AutoencoderKL(**vae_cfg, **_FLUX_LATENT_STATS),
            text_encoder=CLIPTextModel(_clip_config(clip_size, clip_vocab)),
            tokenizer=byte_level_clip_tokenizer(),
            text_encoder_2=T5EncoderModel(_t5_config(t5_size, t5_vocab)),
            tokenizer_2=char_level_t5_tokenizer(t5_max_length),
        )
    )


_BYTE_VOCAB = 514  # see byte_level_clip_tokenizer
_T5_TINY_VOCAB = 4 + 2 * len([c for c in string.printable if not c.isspace()])


# -- tiny pipelines (tests) ---------------------------------------------------------
# The text encoders both tiny pipelines share: 2-layer CLIP (hidden 8), 1-layer T5 (d_model 16).
_TINY_CLIP = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": 8}
_TINY_T5 = {"d_model": 16, "d_ff": 32, "d_kv": 8, "num_layers": 1, "num_heads": 2}

def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A ~1 MB random-weight SD3 pipeline: 1 transformer layer (2 heads x 8,
    patch 2, 16 latent channels), two 2-layer CLIPs (hidden 8, projection 8), a
    1-layer T5 (d_model 16) and a VAE with the real 8x factor and 16 channels.
    ``joint_attention_dim`` = 16 >= 8 + 8 (the concatenated CLIP hidden sizes)."""
    clip, t5 = _TINY_CLIP, _TINY_T5
    transformer = {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 16,
        "pos_embed_max_size": 96,
    }
    with _build_context(seed, torch.float32, "cpu"):
        return _sd3_pipeline(transformer, _TINY_VAE, (clip, clip), t5, _BYTE_VOCAB, _T5_TINY_VOCAB, 256)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A ~1 MB random-weight FLUX pipeline: 1 double + 1 single block (2 heads x
    16, rope axes (4, 6, 6)), 64 packed input channels, a 2-layer CLIP (hidden 8),
    a 1-layer T5 (d_model 16) and a VAE with the real 8x factor and 16 channels.
    ``guidance_embeds=True`` mimics the guidance-distilled FLUX.1-dev."""
    clip, t5 = _TINY_CLIP, _TINY_T5
    transformer = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 16,
        "pooled_projection_dim": 8,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (4, 6, 6),
    }
    with _build_context(seed, torch.float32, "cpu"):
        return _flux_pipeline(transformer, _TINY_VAE, clip, t5, _BYTE_VOCAB, _T5_TINY_VOCAB, 512)


# -- real-size transformers (benchmarks) -------------------------------------------
def _small_encoders(hidden: int, projection: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": projection,
    }


def build_random_sd3_pipeline(
    architecture: str = "sd3-medium",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    text_encoders: str = "small",
    seed: int = 0,
) -> StableDiffusion3Pipeline:
    """An SD3 pipeline whose transformer has the real ``architecture``
    (``SD3_ARCHITECTURES``) and random weights, allocated directly on ``device``
    in ``dtype``. The VAE is the real one (random weights). With
    ``text_encoders="small"`` the CLIPs are 2-layer encoders whose projections
    (1024 + 1024) give the real pooled width 2048 and the T5 is one narrow layer
    with the real ``d_model`` 4096; ``"real"`` builds CLIP-L, CLIP-G and T5-XXL
    sizes (about 5.5 B parameters more)."""
    if architecture not in SD3_ARCHITECTURES:
        raise ValueError(f"unknown SD3 architecture {architecture!r}; known: {sorted(SD3_ARCHITECTURES)}")
    cfg = SD3_ARCHITECTURES[architecture]
    if text_encoders == "small":
        clips = (_small_encoders(64, 1024), _small_encoders(64, 1024))
        t5 = {"d_model": cfg["joint_attention_dim"], "d_ff": 64, "d_kv": 16, "num_layers": 1, "num_heads": 2}
        clip_vocab, t5_vocab = _BYTE_VOCAB, _T5_TINY_VOCAB
    elif text_encoders == "real":
        clips = (_CLIP_L, _CLIP_G)
        t5, clip_vocab, t5_vocab = _T5_XXL, 49408, 32128
    else:
        raise ValueError(f"text_encoders must be 'small' or 'real', not {text_encoders!r}")
    with _build_context(seed, dtype, device):
        return _sd3_pipeline(cfg, _REAL_VAE, clips, t5, clip_vocab, t5_vocab, 256)


def build_random_flux_pipeline(
    architecture: str = "flux-dev",
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    text_encoders: str = "small",
    seed: int = 0,
) -> FluxPipeline:
    """A FLUX pipeline whose transformer has the real ``architecture``
    (``FLUX_ARCHITECTURES``; FLUX.1-dev: 19 double + 38 single blocks, 24 heads x
    128, about 11.9 B parameters, 24 GB in bf16) and random weights, allocated
    directly on ``device`` in ``dtype``. The VAE is the real one (random weights).
    ``text_encoders="small"``: a 2-layer CLIP with the real pooled width 768 and a
    one-layer T5 with the real ``d_model`` 4096; ``"real"``: CLIP-L and T5-XXL."""
    if architecture not in FLUX_ARCHITECTURES:
        raise ValueError(f"unknown FLUX architecture {architecture!r}; known: {sorted(FLUX_ARCHITECTURES)}")
    cfg = FLUX_ARCHITECTURES[architecture]
    if text_encoders == "small":
        # FluxPipeline pools with CLIPTextModel.pooler_output (hidden width, no
        # projection), so the small CLIP keeps CLIP-L's hidden size 768.
        clip = _small_encoders(768, 768)
        t5 = {"d_model": cfg["joint_attention_dim"], "d_ff": 64, "d_kv": 16, "num_layers": 1, "num_heads": 2}
        clip_vocab, t5_vocab = _BYTE_VOCAB, _T5_TINY_VOCAB
    elif text_encoders == "real":
        clip, t5, clip_vocab, t5_vocab = _CLIP_L, _T5_XXL, 49408, 32128
    else:
        raise ValueError(f"text_encoders must be 'small' or 'real', not {text_encoders!r}")
    with _build_context(seed, dtype, device):
        return _flux_pipeline(cfg, _REAL_VAE, clip, t5, clip_vocab, t5_vocab, 512)
