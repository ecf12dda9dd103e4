"""`privacy-firewall benchmark`: model evaluations, time and memory of the firewall.

    privacy-firewall benchmark                                   # the configured backend and weights
    privacy-firewall benchmark backend.model_path=/path/to/embedded
    privacy-firewall benchmark --random-weights --architecture tiny-sd3 --height 64 --width 64
    privacy-firewall benchmark --random-weights --architecture sd3-medium   # full size: needs a GPU

The backend is the configured one (``backend=...`` and its weights), or with
``--random-weights`` a model with random weights: ``--architecture`` tiny-sd3 /
tiny-flux (about 1 MB, CPU, seconds: plumbing and NFE accounting), sd3-medium /
flux-dev (the real transformer sizes, 2 B / 12 B parameters: CUDA only), or
without ``--architecture`` the configured backend's own architecture (the
embedded U-Net, sd3-medium or flux-dev). An SD3/FLUX architecture brings the
FlowEdit defaults of ``conf/backend/sd3.yaml`` / ``flux.yaml`` unless a
``backend=`` override is given.

``--images`` synthetic-clinic photos at ``--height`` x ``--width`` (default: the
backend's working size; 256 for the tiny architectures) go through the firewall
as ``privacy-firewall deidentify`` and the ClientApp run it: a folder of photos,
a cold cache and a throw-away key, every image the settings make (surrogate,
its healthy twin, the patient's own twin), the identity gate with its redraws,
the masks and the calibration of theta*. Per photo, as the median over
``--repeats``:

* ``seconds_per_photo``: the whole ``deidentify`` (reading, editing, checking,
  masks, calibration, writing);
* ``nfe_per_photo``: every network evaluation the backend made (all gate
  attempts), and ``nfe_per_accepted_photo``: what the report counts per
  accepted photo (its successful attempt), which ``privacy-firewall evaluate``
  reports as ``nfe_per_image``;
* ``stages``: seconds per photo in ``edit`` (identities, FlowEdit, decoding,
  pixel checks), ``gate`` (the identity matcher), ``attributes`` (the source's
  sex and kept attributes), ``out_of_distribution`` and ``io_mask_calibration``
  (the rest of ``deidentify``).

With ``--flowedit-breakdown``, ``flowedit`` breaks the FlowEdit cost down on the
same photos (one traversal per target set, without the firewall around it):
``nfe_single_edit`` (the surrogate alone), ``nfe_twin_pair`` (surrogate and twin
sharing the source branch), ``nfe_twin_pair_separate`` (the two run one after the
other), ``nfe_saving`` (separate / pair) and ``nfe_configured`` (the configured
targets). Memory: ``peak_rss_mb`` (the process's maximum resident set),
``peak_cuda_mb`` on CUDA. The CLI prints the result as JSON on the last stdout
line; progress goes to stderr.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from privacy_firewall.backends import (
    FlowBackend,
    RandomArchitecture,
    backend_class,
    load_backend,
    random_architectures,
)
from privacy_firewall.flowedit import FlowEditSettings, flowedit
from privacy_firewall.images import to_tensor_batch
from privacy_firewall.settings import FirewallSettings, load_firewall_settings

#: Seed of the benchmark's random weights and clinic images (public: nothing is edited for real).
BENCHMARK_SEED = 0

log = logging.getLogger(__name__)

SEX_WORDS = {"female": "woman", "male": "man"}


def _usage_error(message: str) -> Exception:
    from privacy_firewall.deidentify import UsageError

    return UsageError(message)


# -- the backend ------------------------------------------------------------------------
def architecture_backend(architecture: str) -> tuple[type[FlowBackend], RandomArchitecture]:
    """The backend class that builds ``architecture`` with random weights (each
    backend declares its own ``random_architectures``) and what it is."""
    owners = random_architectures()
    if architecture not in owners:
        raise _usage_error(f"--architecture {architecture}: choose one of {', '.join(sorted(owners))}")
    cls = backend_class(owners[architecture])
    return cls, cls.random_architectures[architecture]


def _small_architectures() -> str:
    return " or ".join(a for a in sorted(random_architectures()) if not architecture_backend(a)[1].full_size)


def _explicit(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _weights_gib(pipe_or_model: Any, dtype: torch.dtype) -> float:
    modules = getattr(pipe_or_model, "components", {"model": pipe_or_model})
    params = sum(p.numel() for m in modules.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    return params * torch.empty((), dtype=dtype).element_size() / 2**30


def _check_full_size_fits(architecture: str, device: torch.device, dtype: torch.dtype) -> float:
    """Refuse a full-size random model without a GPU that can hold it; returns its
    weights' size in GiB (measured on the meta device: nothing is allocated)."""
    cls, _ = architecture_backend(architecture)
    gib = _weights_gib(cls.random_pipeline(architecture, dtype=dtype, device="meta"), dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    need = gib * 1.15 + 2.0  # weights, plus room for the activations of a batch
    if device.type != "cuda":
        why = "no CUDA device is available" if not torch.cuda.is_available() else f"backend.device is {device}"
        raise _usage_error(
            f"--architecture {architecture} builds the full-size model with random weights: {gib:.1f} GiB of "
            f"weights in {dtype_name} plus activations, which needs a CUDA GPU with at least about {need:.0f} GiB "
            f"of memory, and {why}. On this machine use --architecture {_small_architectures()} (CPU, seconds)."
        )
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if total < gib * 1.05:
        raise _usage_error(
            f"--architecture {architecture}: {gib:.1f} GiB of weights in {dtype_name} do not fit on {device} "
            f"({total:.1f} GiB); use a larger GPU" + (" or backend.dtype=bf16" if dtype == torch.float32 else "") + "."
        )
    if total < need:
        log.warning("%s on %s (%.0f GiB): it may run out of memory; lower firewall.batch_size if it does",
                    architecture, device, total)
    return gib


def build_backend(
    cfg: FirewallSettings, random_weights: bool, architecture: str | None, tiny_dtype: str | None = None
) -> tuple[FlowBackend, str, str]:
    """The backend to measure: (backend, architecture, weights) with weights
    ``"pretrained"`` or ``"random"``. The tiny architectures run in fp32 unless
    ``tiny_dtype`` is given."""
    from privacy_firewall.backends.loading import resolve_device, resolve_dtype

    if not random_weights:
        return load_backend(cfg.backend), cfg.backend.name, "pretrained"
    device = resolve_device(cfg.backend.device)
    cls, spec = architecture_backend(architecture)
    if spec.full_size:
        dtype = resolve_dtype(cfg.backend.dtype)
        _check_full_size_fits(architecture, device, dtype)
    else:
        dtype = resolve_dtype(tiny_dtype or "fp32")
    backend = cls.random_weights(architecture, cfg.backend, dtype=dtype, device=device, seed=BENCHMARK_SEED)
    return backend, architecture, "random"


# -- images -------------------------------------------------------------------------------
def clinic_images(n: int, height: int, width: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` synthetic-clinic photos (RGB uint8, height x width) and their sex words.
    Rendered at most 512 px and resized: the content does not change the cost."""
    from synthetic_clinic import render, subject_for

    side = min(max(height, width), 512)
    images, sexes = [], []
    for i in range(n):
        subject = subject_for(seed, i)
        rgb = render(subject, side)[0]
        if rgb.shape[:2] != (height, width):
            interp = cv2.INTER_AREA if side > max(height, width) else cv2.INTER_CUBIC
            rgb = cv2.resize(rgb, (width, height), interpolation=interp)
        images.append(np.ascontiguousarray(rgb))
        sexes.append(SEX_WORDS.get(subject.sex, "person"))
    return images, sexes


# -- measurement ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def benchmark(cfg: FirewallSettings, *, random_weights: bool, architecture: str | None, height: int | None,
              width: int | None, images: int, repeats: int, overrides: list[str], breakdown: bool = False) -> dict:
    """Measure the firewall's NFE, time and memory; see the module docstring.

    The arguments are those of ``privacy-firewall benchmark`` (its parser holds
    the defaults); ``height``/``width`` None: the model's working size."""
    n_images = images
    if n_images < 1 or repeats < 1:
        raise _usage_error(f"--images ({n_images}) and --repeats ({repeats}) must be at least 1")
    if architecture is not None and not random_weights:
        raise _usage_error(f"--architecture {architecture} builds a model with random weights: add --random-weights")
    if random_weights:
        if architecture is None:  # the configured backend's own (default) architecture
            architecture = next(iter(backend_class(cfg.backend.name).random_architectures), None)
            if architecture is None:
                raise _usage_error(f"the {cfg.backend.name} backend builds no model with random weights: "
                                   f"give --architecture ({', '.join(sorted(random_architectures()))})")
        fam = architecture_backend(architecture)[0].name  # an unknown architecture is a usage error
        if cfg.backend.name != fam:
            if _explicit(overrides, "backend"):
                raise _usage_error(f"--architecture {architecture} needs backend={fam}, but backend={cfg.backend.name} was given")
            cfg = load_firewall_settings([f"backend={fam}", *overrides])  # that family's FlowEdit defaults
    # Tiny models run in fp32 unless backend.dtype is given on the command line.
    tiny_dtype = cfg.backend.dtype if _explicit(overrides, "firewall.backend.dtype") else None

    t_load = time.perf_counter()
    backend, architecture, weights = build_backend(cfg, random_weights, architecture, tiny_dtype)
    load_seconds = time.perf_counter() - t_load
    device = backend.device

    import secrets

    from privacy_firewall.firewall import PrivacyFirewall

    # A throw-away key: the benchmark edits nothing for real and must not create the hospital's key.
    firewall = PrivacyFirewall(cfg, backend=backend, use_cache=False, key=secrets.token_bytes(32))
    # Tiny architectures have their own default size (the tiny SD3 transformer's native one is 32 x 8).
    default_size = (architecture_backend(architecture)[1].working_size if weights == "random" else None) \
        or int(firewall.working_size)
    height = height or default_size
    width = width or default_size
    multiple = backend.size_multiple
    if height % multiple or width % multiple or height < multiple or width < multiple:
        raise _usage_error(
            f"--height {height} --width {width}: the {backend.name} backend needs sides that are positive "
            f"multiples of {multiple}"
        )

    images, sexes = clinic_images(n_images, height, width, BENCHMARK_SEED)
    result = _describe(cfg, backend, architecture, weights, height, width, n_images, repeats, load_seconds)
    try:
        _warm_up(cfg, firewall, backend, images[0], (height, width))
        flowedit_nfe = _flowedit_breakdown(cfg, firewall, backend, images, sexes, height, width) if breakdown else None
        result.update(_median_of([real_path(cfg, backend, images) for _ in range(repeats)]))
    except torch.cuda.OutOfMemoryError as exc:
        raise _usage_error(
            f"out of GPU memory ({exc}); lower firewall.batch_size (now {cfg.batch_size}), --height/--width or --images"
        ) from None
    if flowedit_nfe is not None:
        result["flowedit"] = flowedit_nfe
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def _warm_up(cfg: FirewallSettings, firewall, backend: FlowBackend, image: np.ndarray, size: tuple[int, int]) -> None:
    """One FlowEdit step on one photo, not timed: kernels, allocator and prompt
    caches stay out of the measured runs."""
    from privacy_firewall.firewall import pixel_digest

    plan = firewall.plan_for("person", firewall.identity_for(pixel_digest(image), 0))
    if not cfg.flowedit.n_max:
        return
    with torch.inference_mode():
        x = backend.encode_images(to_tensor_batch([image]).to(backend.device))
        flowedit(backend, x, [plan.source], [plan.targets[:1]], replace(cfg.flowedit, n_max=1, n_min=0), [0],
                 image_size=size)


def _flowedit_breakdown(cfg: FirewallSettings, firewall, backend: FlowBackend, images: list[np.ndarray],
                        sexes: list[str], height: int, width: int) -> dict:
    """FlowEdit alone on the benchmark's photos: NFE of one target, of the twin pair
    sharing the source branch and of the two run separately, and of the configured
    targets (the SD3/FLUX path: one traversal from the photo)."""
    from privacy_firewall.firewall import pixel_digest

    n_images = len(images)
    device = backend.device
    identities = [firewall.identity_for(pixel_digest(img), 0) for img in images]
    plans = [firewall.plan_for(s, ident) for s, ident in zip(sexes, identities)]
    seeds = [firewall.noise_seed(pixel_digest(img), 0) for img in images]
    settings = cfg.flowedit
    batch = cfg.batch_size
    batches = [list(range(s, min(s + batch, n_images))) for s in range(0, n_images, batch)]
    k_configured = len(plans[0].targets)

    # NFE runs: (name, indices into the firewall's target list [surrogate, healthy twin, original's twin])
    runs = [("single", [0]), ("healthy_alone", [1]), ("twin_pair", [0, 1])]
    nfe: dict[str, float] = {}
    edit_seconds: dict[str, float] = {}
    bar = tqdm(total=(len(runs) + 1) * len(batches), desc="FlowEdit breakdown", unit="edit", file=sys.stderr)
    try:
        with torch.inference_mode():
            latents = [backend.encode_images(to_tensor_batch([images[i] for i in idx]).to(device)) for idx in batches]
            # Prompts are encoded once per process in a running firewall: not part of the timings.
            backend.encode_prompts(list(dict.fromkeys(p for plan in plans for p in [plan.source, *plan.targets])))

            def edit(idx: list[int], x: torch.Tensor, which: list[int], s: FlowEditSettings = settings):
                return flowedit(backend, x, [plans[i].source for i in idx], [[plans[i].targets[j] for j in which] for i in idx],
                                s, [seeds[i] for i in idx], image_size=(height, width))

            if settings.n_max:  # warm-up (kernels, allocator): one step, not measured
                edit(batches[0], latents[0], [0, 1], replace(settings, n_max=1, n_min=0))
            for name, which in runs:
                _sync(device)
                before, total = time.perf_counter(), 0.0
                for idx, x in zip(batches, latents):
                    total += edit(idx, x, which).nfe_per_image * len(idx)
                    bar.update(1)
                _sync(device)
                nfe[name] = total / n_images
                edit_seconds[name] = (time.perf_counter() - before) / n_images

            _sync(device)
            before, total = time.perf_counter(), 0.0
            for idx in batches:  # one traversal with the configured targets: encode, edit, decode
                x = backend.encode_images(to_tensor_batch([images[i] for i in idx]).to(device))
                out = edit(idx, x, list(range(k_configured)))
                for j in range(out.latents.shape[1]):
                    backend.decode_latents(out.latents[:, j]).cpu()
                total += out.nfe_per_image * len(idx)
                bar.update(1)
            _sync(device)
            configured_seconds = (time.perf_counter() - before) / n_images
            nfe_configured = total / n_images
    except torch.cuda.OutOfMemoryError as exc:
        raise _usage_error(
            f"out of GPU memory ({exc}); lower firewall.batch_size (now {batch}), --height/--width or --images"
        ) from None
    finally:
        bar.close()

    separate = nfe["single"] + nfe["healthy_alone"]
    return {
        "nfe_single_edit": nfe["single"],
        "nfe_twin_pair": nfe["twin_pair"],
        "nfe_twin_pair_separate": separate,
        "nfe_saving": round(separate / nfe["twin_pair"], 6) if nfe["twin_pair"] else None,
        "nfe_saving_fraction": round(1 - nfe["twin_pair"] / separate, 6) if separate else None,
        "targets_configured": k_configured,
        "nfe_configured": nfe_configured,
        "seconds_per_image": round(configured_seconds, 6),
        "edit_seconds_per_image_single": round(edit_seconds["single"], 6),
        "edit_seconds_per_image_twin_pair": round(edit_seconds["twin_pair"], 6),
        "edit_seconds_per_image_twin_pair_separate": round(edit_seconds["single"] + edit_seconds["healthy_alone"], 6),
    }


def _describe(cfg: FirewallSettings, backend: FlowBackend, architecture: str, weights: str, height: int, width: int,
              n_images: int, repeats: int, load_seconds: float) -> dict[str, Any]:
    f = cfg.flowedit
    return {
        "backend": backend.name, "architecture": architecture, "weights": weights, "device": str(backend.device),
        "dtype": str(backend.dtype).removeprefix("torch."), "height": height, "width": width, "images": n_images,
        "repeats": repeats, "batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "steps": f.steps,
        "n_max": f.n_max, "n_min": f.n_min, "n_avg": f.n_avg, "guidance_mode": f.guidance_mode,
        "true_cfg": bool(backend.has_true_cfg), "original_healthy_twin": bool(cfg.original_healthy_twin),
        "load_seconds": round(load_seconds, 3),
    }


#: The firewall's stages, timed by wrapping these callables of one firewall run.
STAGES = {"edit": ("firewall", "_edit_batch"), "gate": ("gate", "check"),
          "attributes": ("backend", "kept_attributes"), "sex": ("firewall", "resolve_sex"),
          "out_of_distribution": ("backend", "out_of_distribution")}


def real_path(cfg: FirewallSettings, backend: FlowBackend, images: list[np.ndarray]) -> dict[str, Any]:
    """``images`` through ``deidentify_folder`` with a cold cache and a throw-away
    key, timed per stage; per photo."""
    import secrets
    import tempfile
    from pathlib import Path

    from privacy_firewall.cache import FirewallCache
    from privacy_firewall.deidentify import deidentify_folder
    from privacy_firewall.firewall import PrivacyFirewall
    from privacy_firewall.images import write_png

    with tempfile.TemporaryDirectory(prefix="skinfed-benchmark-") as tmp:
        root = Path(tmp)
        for i, rgb in enumerate(images):
            write_png(root / "photos" / f"photo_{i:04d}.png", rgb)
        # A throw-away key and a cold cache: the benchmark never touches the hospital's.
        firewall = PrivacyFirewall(cfg, backend=backend, cache=FirewallCache(root / "cache"),
                                   key=secrets.token_bytes(32))
        owners = {"firewall": firewall, "gate": firewall.gate, "backend": backend}
        seconds = dict.fromkeys(STAGES, 0.0)
        for stage, (owner, name) in STAGES.items():
            setattr(owners[owner], name, _timed(getattr(owners[owner], name), seconds, stage))
        try:
            nfe_before = backend.nfe
            _sync(backend.device)
            t0 = time.perf_counter()
            report = deidentify_folder(root / "photos", root / "out", cfg, firewall=firewall, progress=False)
            _sync(backend.device)
            total = time.perf_counter() - t0
        finally:
            for owner, name in STAGES.values():
                owners[owner].__dict__.pop(name, None)
        nfe = backend.nfe - nfe_before
    n = len(images)
    accepted = [ph.statistics["nfe"] for ph in report.photos.values() if ph.statistics.get("nfe")]
    seconds["attributes"] += seconds.pop("sex")
    seconds["io_mask_calibration"] = max(0.0, total - sum(seconds.values()))
    return {
        "seconds_per_photo": total / n,
        "nfe_per_photo": nfe / n,
        "nfe_per_accepted_photo": statistics.mean(accepted) if accepted else None,
        "accepted": report.ok,
        "refused": report.failed,
        "stages": {k: v / n for k, v in seconds.items()},
    }


def _timed(fn, seconds: dict[str, float], stage: str):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[stage] += time.perf_counter() - t0
    return timed


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats' medians (counts from the first run: the same photos and key
    schedule give the same counts)."""
    med = lambda key: round(statistics.median(r[key] for r in runs), 6)  # noqa: E731
    first = runs[0]
    return {
        "seconds_per_photo": med("seconds_per_photo"),
        "seconds_per_photo_repeats": [round(r["seconds_per_photo"], 6) for r in runs],
        "nfe_per_photo": round(statistics.median(r["nfe_per_photo"] for r in runs), 3),
        "nfe_per_accepted_photo": first["nfe_per_accepted_photo"],
        "accepted": first["accepted"],
        "refused": first["refused"],
        "stages": {k: round(statistics.median(r["stages"][k] for r in runs), 6) for k in first["stages"]},
    }


__all__ = ["architecture_backend", "benchmark", "build_backend", "clinic_images", "peak_rss_mb"]
