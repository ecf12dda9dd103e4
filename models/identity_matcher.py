"""Who is this? A small CNN that embeds a face's identity, for the firewall's gate
and for the re-identification attackers that score it.

An :class:`IdentityEmbedder` maps a 64x64 image (RGB, or a 1-channel erythema
mask) to a unit vector; two images of one identity land close together, two
identities far apart. It is trained with InfoNCE on *views*: for every identity
two or more images of it (the same clinic subject rendered with other erythema,
or a photo and the surrogate an attacker made of it), every other identity in
the batch being a negative (:func:`train_embedder`).

The gate's matcher (:class:`IdentityMatcher`, ``models/embedded/identity_matcher.*``)
is such an embedder trained on clinic renders with a calibrated distance
threshold: a surrogate closer than ``threshold`` to its own source is "still
identifiable". At that threshold ``false_match_rate`` of pairs of *different*
held-out subjects are called the same person.

Train and calibrate it with ``python -m scripts.train_identity_matcher matcher``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MATCHER_NAME = "identity_matcher"


@dataclass
class IdentityEmbedderConfig:
    in_channels: int = 3  # 3 for RGB images, 1 for masks
    width: int = 16  # channels of the first block; doubled per block
    embed_dim: int = 64
    image_size: int = 64  # inputs are resized to this


class IdentityEmbedder(nn.Module):
    """Four conv stages (each halves the resolution), then a linear map of the
    whole 4x4 feature grid: no global pooling, so *where* things are (eye
    spacing, face width, where the erythema is) stays in the embedding."""

    def __init__(self, config: IdentityEmbedderConfig | None = None) -> None:
        super().__init__()
        self.config = config or IdentityEmbedderConfig()
        c, w = self.config.in_channels, self.config.width
        widths = (w, 2 * w, 4 * w, 8 * w)
        # A strided stem (learned downsampling keeps small details such as the iris
        # colour that a resize would average away), then three conv-pool blocks.
        layers: list[nn.Module] = [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.SiLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.SiLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        grid = self.config.image_size // 16
        self.project = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(widths[-1] * grid * grid, self.config.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) in [0, 1] -> (B, embed_dim) unit vectors."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self.project(self.features(images * 2 - 1)), dim=1)


# --------------------------------------------------------------------------------------
# arrays in, tensors out
# --------------------------------------------------------------------------------------


def to_model_input(images: np.ndarray | Sequence[np.ndarray], size: int | None = None) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3), or boolean / [0, 1] masks (N, H, W), as a
    float tensor (N, C, H, W) in [0, 1]; a list may mix sizes if ``size`` is given."""
    if not isinstance(images, np.ndarray):
        import cv2

        arrays = [np.asarray(x) for x in images]
        if size is not None:
            arrays = [x if x.shape[:2] == (size, size) else
                      cv2.resize(x.astype(np.float32) if x.dtype == bool else x, (size, size), interpolation=cv2.INTER_AREA)
                      for x in arrays]
        images = np.stack(arrays)
    if images.dtype == bool:
        x = torch.from_numpy(images.astype(np.float32))
    elif images.dtype == np.uint8:
        x = torch.from_numpy(images).float().div_(255.0)
    else:
        x = torch.from_numpy(np.asarray(images, np.float32))
    if x.ndim == 3:  # masks: one channel
        return x[:, None]
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class AugmentSettings:
    """Light perturbations so the embedding reads generated (imperfect) images too."""

    noise: float = 0.03  # max std of added Gaussian noise
    blur_probability: float = 0.3  # chance of a 3x3 Gaussian blur
    colour: float = 0.05  # max relative brightness change (per-channel gain varies by half of it)
    shift: int = 2  # max translation in pixels
    # Generation artefacts (off by default): a translucent ghost of another image
    # of the batch (up to ``blend_max`` opacity), as when an edit half-paints new
    # hair over the old face, and blotchy low-frequency colour noise.
    blend_probability: float = 0.0
    blend_max: float = 0.35
    blotch: float = 0.0  # max amplitude of the low-frequency colour noise

    @classmethod
    def for_generated_images(cls) -> AugmentSettings:
        """What the gate's matcher trains with: it must still link a surrogate
        that carries generation artefacts to its source."""
        return cls(noise=0.04, blur_probability=0.4, colour=0.06, shift=2, blend_probability=0.5, blotch=0.08)

    @classmethod
    def for_masks(cls) -> AugmentSettings:
        return cls(noise=0.0, blur_probability=0.0, colour=0.0, shift=1)

    @classmethod
    def none(cls) -> AugmentSettings:
        return cls(noise=0.0, blur_probability=0.0, colour=0.0, shift=0)


def augment(x: torch.Tensor, settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """x: (B, C, H, W) in [0, 1] -> a perturbed copy."""
    b, c = x.shape[:2]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    if settings.shift > 0:
        # Whole-pixel translations (exact under bilinear sampling), edges repeated.
        h, w = x.shape[-2:]
        shift = torch.randint(-settings.shift, settings.shift + 1, (b, 2), generator=generator).float()
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = shift[:, 0] * 2 / w
        theta[:, 1, 2] = shift[:, 1] * 2 / h
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if settings.colour > 0 and c == 3:
        brightness = 1 + settings.colour * (2 * uniform(b, 1, 1, 1) - 1)
        gain = 1 + 0.5 * settings.colour * (2 * uniform(b, 3, 1, 1) - 1)
        x = x * brightness * gain
    if settings.blur_probability > 0:
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(c, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
        pick = (uniform(b, 1, 1, 1) < settings.blur_probability).float()
        x = pick * blurred + (1 - pick) * x
    if settings.blend_probability > 0 and b > 1:
        other = x.roll(1, dims=0)  # another image of the batch
        alpha = settings.blend_max * uniform(b, 1, 1, 1) * (uniform(b, 1, 1, 1) < settings.blend_probability).float()
        x = (1 - alpha) * x + alpha * other
    if settings.blotch > 0:
        coarse = (2 * uniform(b, c, 4, 4) - 1) * settings.blotch * uniform(b, 1, 1, 1)
        x = x + F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=False)
    if settings.noise > 0:
        x = x + settings.noise * uniform(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


# --------------------------------------------------------------------------------------
# training: InfoNCE on views of identities
# --------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    steps: int = 600
    batch_size: int = 64  # identities per step; each is a positive pair, the rest its negatives
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    seed: int = 0


def info_nce_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` must pick row i of ``b`` among all rows, and back."""
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_embedder(
    views: np.ndarray,
    config: IdentityEmbedderConfig | None = None,
    settings: TrainSettings | None = None,
    augmentation: AugmentSettings | None = None,
    view_weights: Sequence[float] | None = None,
    progress: bool = True,
    description: str = "train identity embedder",
) -> tuple[IdentityEmbedder, dict]:
    """Train an embedder on ``views``: (N identities, V >= 2 views, H, W[, 3]),
    uint8 RGB or boolean masks. Each step draws ``batch_size`` identities and two
    different views of each (view ``v`` with probability ``view_weights[v]``).

    Returns the model (in eval mode) and a record: seconds, steps, final loss,
    the loss curve (mean per 25 steps)."""
    from tqdm import tqdm

    config = config or IdentityEmbedderConfig(in_channels=1 if views.ndim == 4 else 3)
    settings = settings or TrainSettings()
    augmentation = augmentation or (AugmentSettings() if config.in_channels == 3 else AugmentSettings.for_masks())
    n, v = views.shape[:2]
    if v < 2:
        raise ValueError(f"need at least 2 views per identity, got {v}")
    if n < 2:
        raise ValueError(f"need at least 2 identities, got {n}")
    p = np.ones(v) if view_weights is None else np.asarray(view_weights, np.float64)
    p = p / p.sum()
    batch = min(settings.batch_size, n)

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = IdentityEmbedder(config)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step, settings.steps) / settings.steps)))
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(settings.steps), desc=description, unit="step", disable=not progress)
    for _ in bar:
        ids = rng.choice(n, size=batch, replace=False)
        first = rng.choice(v, size=batch, p=p)
        # A second view different from the first, drawn with the same weights.
        second = np.array([rng.choice(v, p=np.where(np.arange(v) == f, 0, p) / (1 - p[f])) for f in first])
        a = augment(to_model_input(views[ids, first]), augmentation, generator)
        b = augment(to_model_input(views[ids, second]), augmentation, generator)
        loss = info_nce_loss(model(a), model(b), settings.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    seconds = time.perf_counter() - t0
    curve = [round(float(np.mean(losses[i : i + 25])), 4) for i in range(0, len(losses), 25)]
    record = {"seconds": round(seconds, 1), "steps": settings.steps, "identities": int(n), "views": int(v),
              "final_loss": curve[-1] if curve else None, "loss_curve": curve}
    return model.eval(), record


@torch.no_grad()
def embed_images(model: IdentityEmbedder, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Unit embeddings (N, D) of uint8 images or masks."""
    model.eval()
    size = model.config.image_size
    out = []
    for s in range(0, len(images), batch_size):
        out.append(model(to_model_input(images[s : s + batch_size], size)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


# --------------------------------------------------------------------------------------
# calibration: a distance threshold at a stated false-match rate
# --------------------------------------------------------------------------------------


@dataclass
class Calibration:
    threshold: float  # "same identity" when distance < threshold
    false_match_rate: float  # measured on the impostor pairs at this threshold
    true_match_rate: float  # measured on the genuine pairs
    target_false_match_rate: float
    genuine_pairs: int
    impostor_pairs: int


def calibrate_threshold(genuine: np.ndarray, impostor: np.ndarray, false_match_rate: float = 0.01) -> Calibration:
    """The largest threshold at which at most ``false_match_rate`` of impostor
    pairs (different identities) have a distance below it."""
    impostor = np.sort(np.asarray(impostor, np.float64))
    genuine = np.asarray(genuine, np.float64)
    if impostor.size == 0:
        raise ValueError("no impostor pairs to calibrate on")
    k = int(np.floor(false_match_rate * impostor.size))
    threshold = float(impostor[min(k, impostor.size - 1)])
    return Calibration(
        threshold=threshold,
        false_match_rate=float(np.mean(impostor < threshold)),
        true_match_rate=float(np.mean(genuine < threshold)) if genuine.size else float("nan"),
        target_false_match_rate=false_match_rate,
        genuine_pairs=int(genuine.size),
        impostor_pairs=int(impostor.size),
    )


def impostor_distances(embeddings: np.ndarray) -> np.ndarray:
    """Distances of all pairs of different rows (each row one identity)."""
    d = pairwise_distances(embeddings, embeddings)
    return d[np.triu_indices(len(embeddings), k=1)]


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)) between unit embeddings, in [0, 2]."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


# --------------------------------------------------------------------------------------
# the gate's matcher: model + calibrated threshold, saved next to the flow model
# --------------------------------------------------------------------------------------


class IdentityMatcher:
    """An identity embedder with the distance threshold it was calibrated at.

    ``matcher.distance(surrogates, sources) < matcher.threshold`` says which
    surrogates are still linked to their sources; at that threshold
    ``matcher.false_match_rate`` of different held-out people were called the same.
    """

    name = "embedded identity matcher"

    def __init__(self, model: IdentityEmbedder, threshold: float, false_match_rate: float,
                 metadata: dict | None = None) -> None:
        self.model = model.eval()
        self.threshold = float(threshold)
        self.false_match_rate = float(false_match_rate)
        self.metadata = metadata or {}

    def embed(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images (any size; resized to the model's) -> (N, D) unit embeddings."""
        return embed_images(self.model, images)

    def _as_embeddings(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype != np.uint8:
            return x  # already embeddings
        return self.embed(x)

    def distance(self, a, b) -> np.ndarray:
        """Distance of ``a[i]`` to ``b[i]`` for every i; ``a`` and ``b`` are image
        lists/arrays or embeddings from :meth:`embed`."""
        ea, eb = self._as_embeddings(a), self._as_embeddings(b)
        if ea.shape != eb.shape:
            raise ValueError(f"a and b must have the same length, got {ea.shape[0]} and {eb.shape[0]}")
        return np.linalg.norm(ea.astype(np.float64) - eb.astype(np.float64), axis=1)

    def distances(self, sources: Sequence[np.ndarray], surrogates: Sequence[np.ndarray]) -> np.ndarray:
        """The gate's call: distance of each surrogate to its own source."""
        return self.distance(sources, surrogates)

    def same_identity(self, a, b) -> np.ndarray:
        """True where ``a[i]`` and ``b[i]`` are (probably) the same person."""
        return self.distance(a, b) < self.threshold


def save_identity_matcher(model: IdentityEmbedder, folder: str | Path, calibration: Calibration,
                          metrics: dict | None = None, name: str = MATCHER_NAME) -> None:
    """``folder/<name>.safetensors`` and ``folder/<name>.json`` (config, threshold, metrics), atomically."""
    from common.io import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    atomic_save_safetensors(folder / f"{name}.safetensors", model.state_dict())
    atomic_write_json(folder / f"{name}.json", {
        "config": asdict(model.config),
        "threshold": calibration.threshold,
        "false_match_rate": calibration.false_match_rate,
        "calibration": asdict(calibration),
        "metrics": metrics or {},
    })


def load_identity_matcher(folder: str | Path, name: str = MATCHER_NAME) -> IdentityMatcher:
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / f"{name}.json").read_text())
    model = IdentityEmbedder(IdentityEmbedderConfig(**meta["config"]))
    model.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    return IdentityMatcher(model, meta["threshold"], meta["false_match_rate"], meta)
