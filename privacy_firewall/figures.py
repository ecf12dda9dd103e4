"""The paper's figures as PNG: Fig. 2 panel, Fig. 4 overlay, Fig. 5 histograms,
and the calibration curve. Matplotlib with the Agg backend; no metadata kept."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from privacy_firewall.statistics import a_star_histogram  # noqa: E402

PNG_META = {"Software": None}  # keep matplotlib from writing its text chunk


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110, metadata=PNG_META)
    plt.close(fig)
    tmp.replace(path)
    return path


def overlay(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0), alpha: float = 0.45) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def heat_map(difference: np.ndarray) -> np.ndarray:
    """An a* difference as an RGB heat map (magma), scaled to its 99.5th percentile."""
    import cv2

    scaled = np.clip(difference / max(float(np.percentile(np.abs(difference), 99.5)), 1.0), 0, 1)
    return cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_MAGMA), cv2.COLOR_BGR2RGB)


def agreement_image(m_orig: np.ndarray, m_syn: np.ndarray) -> np.ndarray:
    """Fig. 4 overlay: M_orig green, M_syn magenta, agreement white."""
    out = np.zeros((*m_orig.shape, 3), np.uint8)
    out[m_orig & ~m_syn] = (0, 200, 0)
    out[m_syn & ~m_orig] = (220, 0, 220)
    out[m_orig & m_syn] = (255, 255, 255)
    return out


def twin_panel(surrogate, healthy_twin, difference, mask, path, title: str = "") -> Path:
    """Fig. 2: pathological twin, healthy twin, a* difference, mask, overlay."""
    fig, axes = plt.subplots(1, 5, figsize=(12, 2.8))
    vmax = max(float(np.percentile(np.abs(difference), 99.5)), 1.0)
    items = [
        (surrogate, "(a) pathological twin", None), (healthy_twin, "(b) healthy twin", None),
        (difference, "(c) a* difference", "magma"), (mask, "(d) mask", "gray"),
        (overlay(surrogate, mask), "(e) annotated surrogate", None),
    ]
    for ax, (img, label, cmap) in zip(axes, items):
        if cmap == "magma":
            im = ax.imshow(img, cmap=cmap, vmin=0, vmax=vmax)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        else:
            ax.imshow(img, cmap=cmap)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def mask_stability_figure(rows: list[tuple[str, np.ndarray, np.ndarray]], path) -> Path:
    """Fig. 4 column 3 for several images: (label, M_orig, M_syn) -> overlays."""
    n = max(len(rows), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.8), squeeze=False)
    for ax, (label, m_orig, m_syn) in zip(axes[0], rows):
        ax.imshow(agreement_image(m_orig, m_syn))
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle("M_orig green, M_syn magenta, agreement white", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def histogram_figure(pairs: list[tuple[str, list[np.ndarray], list[np.ndarray], dict]], path) -> Path:
    """Fig. 5: normalised a* histograms of image pairs, one subplot per comparison.

    pairs: (title, images A, images B, statistics dict) -- histograms pooled over images."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.4), squeeze=False)
    for ax, (title, imgs_a, imgs_b, stats) in zip(axes[0], pairs):
        for imgs, label, colour in ((imgs_a, title.split(" vs ")[0], "tab:red"), (imgs_b, title.split(" vs ")[-1], "tab:green")):
            h = np.mean([a_star_histogram(i) for i in imgs], axis=0) if imgs else np.zeros(256)
            ax.plot(np.arange(256), h, color=colour, label=label)
            ax.fill_between(np.arange(256), h, color=colour, alpha=0.2)
        ax.set(xlim=(110, 190), xlabel="a* (OpenCV 8-bit)", ylabel="normalised frequency", title=title)
        if stats:
            ax.text(0.98, 0.95, f"BC {stats.get('bhattacharyya', float('nan')):.3f}\nKS {stats.get('ks_statistic', float('nan')):.3f}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=8)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def calibration_figure(thresholds: np.ndarray, curve: np.ndarray, theta_star: float, path, reference: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(thresholds, curve)
    ax.axvline(theta_star, color="k", ls="--", lw=1)
    ax.set(xlabel="threshold theta (a* units)", ylabel="mean IoU", title=f"theta* = {theta_star:g} vs {reference}")
    fig.tight_layout()
    return _save(fig, path)
