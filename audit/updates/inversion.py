"""Gradient inversion ("Inverting Gradients", Geiping et al., NeurIPS 2020).

The attacker optimises a dummy image so that its one-step gradient matches the
observed one in direction (cosine over all layers), with a total-variation
prior, using Adam on the sign of the gradient and step decay, pixels boxed to
[0, 1]. The label (the mask) is given to the attacker: a stronger attacker
than a real one, so a failure is not explained by a wrong label.

The literature runs 10k-24k iterations on a GPU; the audit states its budget.
A failed reconstruction only means something when the same attack with the same
budget recovers the raw photo from *its* update (the positive control):
otherwise the verdict is "inconclusive", never "safe".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from audit.updates.capture import Update, fedsgd_gradient

RECOVERED, NOT_RECOVERED, INCONCLUSIVE = "recovered", "not recovered", "inconclusive"


@dataclass(frozen=True)
class InversionBudget:
    """How hard the attacker tries. The defaults are a CPU smoke budget (about
    2 minutes per image on one core), far below the literature's 10k+ iterations."""

    iterations: int = 200
    learning_rate: float = 0.1
    tv_weight: float = 1e-2
    seed: int = 0
    start: str = "noise"  # noise (Geiping et al.) | average_face (the gallery's mean: an attacker's prior)

    def __post_init__(self) -> None:
        if self.start not in ("noise", "average_face"):
            raise ValueError(f"inversion start={self.start!r}: noise or average_face")
        if self.iterations < 0:
            raise ValueError("inversion iterations must be >= 0")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def gradient_distance(a: Update, b: Update) -> torch.Tensor:
    """1 - cosine of ``a`` and ``b`` with all layers flattened together."""
    dot = sum((a[n] * b[n]).sum() for n in a)
    na = torch.sqrt(sum((a[n] ** 2).sum() for n in a))
    nb = torch.sqrt(sum((b[n] ** 2).sum() for n in a))
    return 1 - dot / (na * nb + 1e-12)


def invert_gradient(model: nn.Module, loss_fn: nn.Module, observed: Update, mask: np.ndarray, image_size: int,
                    budget: InversionBudget, progress_label: str = "inversion",
                    start: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Reconstruct the training image of a one-image step from its gradient,
    starting from uniform noise or from ``start`` (RGB uint8, e.g. the gallery's
    average face: an attacker with a gallery has that prior).

    The attack runs where ``model`` is (a GPU for the literature's budgets); the
    starting noise is drawn on the CPU, so a seed gives the same start anywhere.

    Returns the reconstruction (RGB uint8) and a trace (losses, seconds)."""
    device = next(model.parameters()).device
    names = list(observed)
    target = {n: observed[n].detach().to(device) for n in names}
    generator = torch.Generator().manual_seed(budget.seed)
    if start is None:
        x = torch.rand((1, 3, image_size, image_size), generator=generator)
    else:
        x = torch.from_numpy(np.asarray(start, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    x = x.to(device).requires_grad_(True)
    y = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None].to(device)
    optimiser = torch.optim.Adam([x], lr=budget.learning_rate)
    milestones = [int(budget.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.1)
    losses: list[torch.Tensor] = []  # kept on the device: a float() per step would wait for the GPU
    start = time.perf_counter()
    for _ in tqdm(range(budget.iterations), desc=progress_label, unit="it", leave=False):
        optimiser.zero_grad(set_to_none=True)
        dummy = fedsgd_gradient(model, loss_fn, x, y, names, create_graph=True)
        loss = gradient_distance(dummy, target) + budget.tv_weight * total_variation(x)
        (grad_x,) = torch.autograd.grad(loss, x)
        x.grad = grad_x.sign()  # Geiping et al.: signed gradients
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        losses.append(loss.detach())
    image = (x.detach()[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    every_25 = torch.stack(losses[::25]).cpu().tolist() if losses else []
    trace = {"iterations": budget.iterations, "final_loss": float(losses[-1]) if losses else float("nan"),
             "loss_every_25": every_25, "seconds": time.perf_counter() - start, "device": str(device)}
    return image, trace


# ----------------------------------------------------------------------------- scoring
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004; Gaussian window sigma 1.5),
    averaged over pixels and colour channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


@dataclass
class ReconstructionScore:
    """How close a reconstruction came to the patient, and whether it names them.

    ``identifies_patient``: the reconstruction's pixel-nearest gallery photo is the
    patient AND it is closer to the patient than the gallery's average face."""

    psnr_patient: float
    ssim_patient: float
    psnr_reference: float  # against the image the update was computed on (surrogate or raw photo)
    ssim_reference: float
    nearest_is_patient: bool
    average_face_psnr: float
    identifies_patient: bool

    def to_dict(self) -> dict:
        return asdict(self)


def score_reconstruction(reconstruction: np.ndarray, reference: np.ndarray, gallery: Sequence[np.ndarray],
                         patient_index: int) -> ReconstructionScore:
    """Score ``reconstruction`` against the training image ``reference`` and the
    patient ``gallery[patient_index]``."""
    patient = gallery[patient_index]
    mean_face = np.mean(np.stack(gallery).astype(np.float64), axis=0).round().astype(np.uint8)
    errors = [np.mean((reconstruction.astype(np.float64) - g.astype(np.float64)) ** 2) for g in gallery]
    nearest_is_patient = int(np.argmin(errors)) == patient_index
    p, baseline = psnr(reconstruction, patient), psnr(mean_face, patient)
    return ReconstructionScore(
        psnr_patient=p, ssim_patient=ssim(reconstruction, patient),
        psnr_reference=psnr(reconstruction, reference), ssim_reference=ssim(reconstruction, reference),
        nearest_is_patient=nearest_is_patient, average_face_psnr=baseline,
        identifies_patient=bool(nearest_is_patient and p > baseline),
    )


def verdict(attack_identifies: Sequence[bool], control_identifies: Sequence[bool]) -> str:
    """The inversion verdict over patients.

    "recovered" if any reconstruction identifies its patient; otherwise "not
    recovered" only if the positive control (the same attack, same budget, on
    the raw photos' updates) identified every patient; else "inconclusive"."""
    if any(attack_identifies):
        return RECOVERED
    if control_identifies and all(control_identifies):
        return NOT_RECOVERED
    return INCONCLUSIVE
