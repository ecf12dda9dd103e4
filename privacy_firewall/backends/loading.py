"""Offline loading of diffusers pipelines, shared by the diffusers backends.

Weights are never downloaded: ``model_path`` is either a local folder in the
diffusers layout (``model_index.json`` plus one sub-folder per component) or a
Hugging Face repo id that must already be in the local cache. Anything missing
raises :class:`ModelNotFoundError` with instructions to fetch the weights on a
machine with internet access.

Nothing here knows a model family: the backend passes its name (for messages),
its pipeline class and its default repo id
(:class:`~privacy_firewall.backends.diffusers_base.DiffusersBackend`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common import device as common_device

logger = logging.getLogger(__name__)

__all__ = [
    "ModelNotFoundError",
    "check_model_folder",
    "decode_with_vae",
    "encode_with_vae",
    "load_pipeline",
    "offline_mode",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_folder",
]

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class ModelNotFoundError(FileNotFoundError):
    """Pretrained weights are not available locally (they are never downloaded)."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"|"fp16"|"bf16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of 'fp32', 'fp16', 'bf16', not {dtype!r}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``firewall.backend.device`` on this machine (the project's one device rule,
    :func:`common.device.resolve_device`: a missing GPU is an error, never the CPU)."""
    return common_device.resolve_device(device, "firewall.backend.device")


def _how_to_provide(kind: str, repo: str) -> str:
    local = f"/models/{kind}"
    return (
        "Weights are never downloaded here (offline). To provide them: on a machine with internet, "
        f"accept the model licence on huggingface.co/{repo} (gated models need `hf auth login`), run\n"
        f"    hf download {repo} --local-dir {local}\n"
        f"(older huggingface_hub: `huggingface-cli download {repo} --local-dir {local}`), copy the folder "
        f"to this machine and set backend.model_path={local}; or copy a populated Hugging Face cache "
        f"(HF_HOME) here and set backend.model_path={repo}."
    )


@contextmanager
def offline_mode() -> Iterator[None]:
    """Forbid Hugging Face hub network access inside the block (``HF_HUB_OFFLINE``)."""
    import huggingface_hub.constants as hf_constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub's HTTP layer
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _component_problems(folder: Path, class_name: str) -> list[str]:
    """What is missing in one component folder (empty list: looks complete)."""
    if not folder.is_dir():
        return [f"{folder.name}/ (folder missing)"]
    files = [p for p in folder.iterdir() if p.exists()]  # exists() drops dangling symlinks
    if "Scheduler" in class_name:
        return [] if (folder / "scheduler_config.json").is_file() else [f"{folder.name}/scheduler_config.json"]
    if "Tokenizer" in class_name or "Processor" in class_name or "FeatureExtractor" in class_name:
        return [] if files else [f"{folder.name}/ (empty)"]
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(f"{folder.name}/config.json")
    indexes = [p for p in files if p.name.endswith(".index.json")]
    weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES) and p.stat().st_size > 0]
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            problems.append(f"{folder.name}/{index.name} (unreadable)")
            continue
        problems += [f"{folder.name}/{s}" for s in sorted(shards) if not (folder / s).exists()]
    if not indexes and not weights:
        problems.append(f"{folder.name}/*.safetensors (no weights)")
    return problems


def check_model_folder(
    path: str | os.PathLike[str],
    kind: str,
    pipeline_class: str,
    default_repo: str,
    skip: tuple[str, ...] = (),
) -> None:
    """Raise :class:`ModelNotFoundError` unless ``path`` is a complete diffusers
    folder holding a ``pipeline_class`` (components named in ``skip`` may be
    absent). ``kind`` (the backend's name) and ``default_repo`` word the error."""
    folder = Path(path)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(
            f"{kind.upper()} weights: {folder} has no model_index.json, so it is not a diffusers "
            f"pipeline folder.\n{_how_to_provide(kind, default_repo)}"
        )
    try:
        index: dict[str, Any] = json.loads(index_file.read_text())
    except ValueError as err:
        raise ModelNotFoundError(
            f"{index_file} is not valid JSON ({err}).\n{_how_to_provide(kind, default_repo)}"
        ) from err
    found = index.get("_class_name")
    if found != pipeline_class:
        raise ModelNotFoundError(
            f"{folder} holds a {found} but the {kind!r} backend needs a {pipeline_class}.\n"
            f"{_how_to_provide(kind, default_repo)}"
        )
    problems: list[str] = []
    for name, spec in index.items():
        if name.startswith("_") or name in skip:
            continue
        if not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None or spec[1] is None:
            continue  # optional component saved as None (e.g. image_encoder)
        problems += _component_problems(folder / name, str(spec[1]))
    if problems:
        raise ModelNotFoundError(
            f"{kind.upper()} weights in {folder} are incomplete; missing: {', '.join(problems)}.\n"
            f"{_how_to_provide(kind, default_repo)}"
        )


def resolve_model_folder(kind: str, model_path: str | os.PathLike[str] | None, default_repo: str) -> Path:
    """A local folder for ``model_path``: the folder itself, or the snapshot of a
    repo id in the offline Hugging Face cache (None: ``default_repo``). Never
    touches the network."""
    import huggingface_hub.constants as hf_constants

    spec = str(model_path) if model_path is not None else default_repo
    local = Path(spec).expanduser()
    looked_for: list[str] = []
    if model_path is not None:
        if local.is_dir():
            return local
        note = " (exists but is not a folder)" if local.exists() else ""
        looked_for.append(f"a local folder {local.resolve()}{note}")
    is_repo_id = bool(_REPO_ID.match(spec)) and not spec.startswith((".", "~"))
    if is_repo_id:
        from huggingface_hub import snapshot_download

        try:
            with offline_mode():
                return Path(snapshot_download(spec, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any cache miss means "not available offline"
            looked_for.append(
                f"the repo {spec!r} in the offline Hugging Face cache {hf_constants.HF_HUB_CACHE} ({type(err).__name__})"
            )
    unset = "backend.model_path is not set, so " if model_path is None else ""
    raise ModelNotFoundError(
        f"{kind.upper()} weights not found: {unset}looked for {' and '.join(looked_for)}.\n"
        f"{_how_to_provide(kind, spec if is_repo_id else default_repo)}"
    )


def load_pipeline(
    kind: str,
    pipeline_class: str,
    default_repo: str,
    model_path: str | None = None,
    dtype: str = "bf16",
    device: str = "auto",
    without: tuple[str, ...] = (),
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    cpu_offload: bool = False,
) -> Any:
    """Load the diffusers ``pipeline_class`` (e.g. ``"FluxPipeline"``) of the
    ``kind`` backend from local files only.

    ``model_path``: a diffusers folder or a cached repo id (None:
    ``default_repo``, from the cache). ``without`` names components to leave
    out: they need not be on disk and are passed as None (SD3 without its T5
    encoder fits a 24 GB card). ``cpu_offload`` uses ``enable_model_cpu_offload``
    when CUDA is available and is ignored with a warning otherwise. Raises
    :class:`ModelNotFoundError` when the weights are missing or incomplete.
    """
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    folder = resolve_model_folder(kind, model_path, default_repo)
    check_model_folder(folder, kind, pipeline_class, default_repo, skip=without)

    pipeline_cls = getattr(importlib.import_module("diffusers"), pipeline_class)
    try:
        with offline_mode():
            pipe = pipeline_cls.from_pretrained(str(folder), local_files_only=True, dtype=torch_dtype,
                                                **dict.fromkeys(without))
    except OSError as err:
        raise ModelNotFoundError(
            f"{kind.upper()} weights in {folder} could not be loaded: {err}\n{_how_to_provide(kind, default_repo)}"
        ) from err

    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if cpu_offload and torch.cuda.is_available():
        pipe.enable_model_cpu_offload(device=target if target.type == "cuda" else "cuda")
    else:
        if cpu_offload:
            logger.warning("cpu_offload ignored: enable_model_cpu_offload needs an accelerator (none found)")
        pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- VAE helpers shared by the diffusers backends ----------------------------------
def _latent_stats(vae: Any) -> tuple[float, float]:
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    return scaling, float(shift) if shift is not None else 0.0


@torch.no_grad()
def encode_with_vae(vae: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """RGB in [0, 1], (B, 3, H, W) -> normalised latents ``(mode - shift) * scale``
    as float32 (FlowEdit integrates in float32; the model casts per call)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    scaling, shift = _latent_stats(vae)
    x = images.to(device=device, dtype=vae.dtype) * 2.0 - 1.0
    latents = vae.encode(x).latent_dist.mode()
    return ((latents.float() - shift) * scaling).contiguous()


@torch.no_grad()
def decode_with_vae(vae: Any, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalised latents -> RGB float32 in [0, 1], (B, 3, H, W)."""
    scaling, shift = _latent_stats(vae)
    z = latents.to(device=device, dtype=torch.float32) / scaling + shift
    images = vae.decode(z.to(vae.dtype)).sample
    return ((images.float() + 1.0) / 2.0).clamp_(0.0, 1.0)
