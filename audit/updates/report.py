"""The audit's outputs: ``audit.json`` (everything) and ``audit.png`` (what the
attacker got back: patient, surrogate, reconstructions; and the linkage ranking
of the first patients under the headline attack on the firewall's updates:
the FedAvg update against replays of the local training with the attacker's seed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from common.io import atomic_write_bytes, atomic_write_json

RANKING_ATTACK = "fedavg_replay_seed_secret"  # the headline attack: the hospital's seed is secret
RANKED_PATIENTS = 6
RANKED_CANDIDATES = 5


def json_safe(value):
    """inf/nan are not JSON: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(out_dir: str | Path, report: dict, images: dict[str, np.ndarray], gallery: list[np.ndarray],
                 surrogates: list[np.ndarray]) -> dict[str, str]:
    """Write ``audit.json`` and ``audit.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit.json", json_safe(report))
    atomic_write_bytes(out / "audit.png", figure_png(report, images, gallery, surrogates))
    return {"report": str(out / "audit.json"), "figure": str(out / "audit.png")}


def figure_png(report: dict, images: dict[str, np.ndarray], gallery: list[np.ndarray],
               surrogates: list[np.ndarray]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inversion_rows = [e["patient"] for e in report["inversion"].get("patients", [])]
    scores = np.array(report["linkage"][RANKING_ATTACK]["firewall"]["scores"])
    ranked = list(range(min(RANKED_PATIENTS, len(scores))))
    columns = 2 + RANKED_CANDIDATES
    rows = len(inversion_rows) + len(ranked)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def show(ax, image: np.ndarray, title: str, colour: str | None = None) -> None:
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
        if colour:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)

    for r, i in enumerate(inversion_rows):
        entry = next(e for e in report["inversion"]["patients"] if e["patient"] == i)
        show(axes[r, 0], images[f"patient_{i}"], f"patient {i}")
        show(axes[r, 1], images[f"surrogate_{i}"], "surrogate")
        for c, kind in enumerate(("firewall", "raw", "firewall_dp"), start=2):
            key = f"reconstruction_{kind}_{i}"
            if key in images:
                label = {"firewall": "inverted: surrogate", "raw": "control: raw photo",
                         "firewall_dp": "inverted: surrogate+DP"}[kind]
                show(axes[r, c], images[key], f"{label}\nPSNR {entry[kind]['psnr_patient']:.1f} dB")
        axes[r, 5].text(0, 0.5, f"verdict: {report['inversion'].get('verdict_firewall', '-')}\n"
                        f"{report['inversion']['budget']['iterations']} iterations\n"
                        f"average face {entry['firewall']['average_face_psnr']:.1f} dB",
                        fontsize=7, va="center")

    for r, i in enumerate(ranked, start=len(inversion_rows)):
        show(axes[r, 0], gallery[i], f"patient {i}")
        show(axes[r, 1], surrogates[i], "trained on")
        order = np.argsort(-scores[i], kind="stable")[:RANKED_CANDIDATES]
        for c, j in enumerate(order, start=2):
            show(axes[r, c], gallery[j], f"rank {c - 1}: cos {scores[i, j]:.2f}",
                 colour="limegreen" if j == i else None)
    top1 = report["linkage"][RANKING_ATTACK]["firewall"]["top1"]
    fig.suptitle(f"Linkage of surrogate updates, attacker replays local training (green = the patient): top-1 {top1:.2f}, "
                 f"chance {report['linkage'][RANKING_ATTACK]['firewall']['chance_top1']:.2f}", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
