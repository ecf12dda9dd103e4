"""A small CNN that reads the synthetic clinic's attributes back from an image.

It is the judge of the embedded firewall's evaluation: did FlowEdit flip the sex
(identity_flip_rate), does the surrogate still show erythema, has its healthy
twin lost it. It is trained on clinic images only and shipped with the embedded
flow model (``attribute_classifier.*``: the four :data:`HEADS`).

The same network with one head per identity attribute (:data:`JUDGE_HEADS`,
``attribute_judge.*``, trained by ``python -m scripts.train_identity_matcher judge``)
scores de-identification: how often a surrogate keeps each attribute of its
source. Its labels are the phrases of the embedded model's attribute-slot
captions (``models.flow_unet.ATTRIBUTE_SLOTS``), so a prediction can be compared
with the caption the surrogate was asked for; :func:`subject_labels` gives the
ground truth of a clinic subject.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.flow_unet import ATTRIBUTE_SLOTS

#: head name -> class labels
HEADS: dict[str, tuple[str, ...]] = {
    "sex": ("female", "male"),
    "erythema": ("absent", "present"),
    "skin_tone_group": ("light", "medium", "dark"),
    "view": ("full_face", "periocular"),
}

#: Every identity attribute of the synthetic clinic, binned as the embedded
#: model's attribute-slot captions bin it (scripts/train_embedded.py subject_slots).
JUDGE_HEADS: dict[str, tuple[str, ...]] = {
    **HEADS,
    **{name: phrases for name, phrases in ATTRIBUTE_SLOTS.items() if name not in ("sex", "state", "skin", "view")},
}

#: Tercile edges of the clinic's sampling ranges (the same bins as the captions').
EYE_SPACING_EDGES = (0.34, 0.38)  # eye_spacing ~ U(0.30, 0.42)
FACE_WIDTH_EDGES = (0.5573, 0.6147)  # face_width in [0.50, 0.672]
HAIRLINE_EDGES = (1 / 3, 2 / 3)  # hairline ~ U(0, 1)
BACKGROUND_LEVEL = 0.55  # a background channel at or above this is "on"


def _bin(value: float, edges: tuple[float, ...]) -> int:
    return int(np.searchsorted(np.asarray(edges), value, side="right"))


def subject_labels(subject, erythema: bool = True) -> dict[str, str]:
    """Ground truth of every :data:`JUDGE_HEADS` head for a clinic subject
    (``synthetic_clinic.Subject``; for an opposite-sex image pass
    ``subject.with_opposite_sex()``). ``erythema``: whether the image shows it."""
    s = subject
    r, g, b = (int(c >= BACKGROUND_LEVEL) for c in s.background)
    index = {
        "sex": HEADS["sex"].index(s.sex),
        "erythema": int(erythema),
        "skin_tone_group": HEADS["skin_tone_group"].index(s.skin_tone_group),
        "view": HEADS["view"].index(s.view),
        "hair_colour": ("black", "brown", "blond", "red", "gray").index(s.hair_colour),
        "hair_length": int(s.hair_length > 0.5),
        "beard": int(s.beard > 0.3),
        "ears": int(s.ear_size >= 1.0),
        "brows": int(s.brow_thickness >= 1.0),
        "eyes": ("brown", "blue", "green", "hazel").index(s.iris_colour),
        "eye_size": int(s.eye_size >= 1.0),
        "eye_spacing": _bin(s.eye_spacing, EYE_SPACING_EDGES),
        "face": _bin(s.face_width, FACE_WIDTH_EDGES),
        "jaw": int(s.jaw_squareness >= 0.5),
        "hairline": _bin(s.hairline, HAIRLINE_EDGES),
        "lips": int(s.lip_redness >= 0.55),
        "background": 4 * r + 2 * g + b,
        "earrings": ("none", "gold", "red").index(s.earring),
        "piercing": ("none", "nose", "brow").index(s.piercing),
    }
    return {head: JUDGE_HEADS[head][i] for head, i in index.items()}


class AttributeClassifier(nn.Module):
    """Conv blocks, global average pooling, one linear head per attribute.

    The defaults (width 32, two convolutions per block, the four :data:`HEADS`)
    are the shipped ``attribute_classifier``; the judge is built with
    ``heads=JUDGE_HEADS`` and a cheaper body (one convolution per block, a
    strided stem) so it trains in minutes on one CPU thread."""

    def __init__(self, width: int = 32, heads: Mapping[str, Sequence[str]] | None = None,
                 convs_per_block: int = 2, stem_stride: int = 1) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            layers: list[nn.Module] = []
            for k in range(convs_per_block):
                layers += [nn.Conv2d(c_in if k == 0 else c_out, c_out, 3, padding=1, stride=stride if k == 0 else 1),
                           nn.BatchNorm2d(c_out), nn.SiLU()]
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, w, stem_stride), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.head_labels: dict[str, tuple[str, ...]] = {name: tuple(labels) for name, labels in (heads or HEADS).items()}
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(labels)) for name, labels in self.head_labels.items()})
        self.width = width
        self.convs_per_block = convs_per_block
        self.stem_stride = stem_stride

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] -> logits per head."""
        x = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        h = self.features(x * 2 - 1).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        logits = self.eval()(images)
        return {name: [self.head_labels[name][i] for i in lg.argmax(1).tolist()] for name, lg in logits.items()}

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax per head: (B, classes)."""
        return {name: lg.softmax(1) for name, lg in self.eval()(images).items()}

    @torch.no_grad()
    def confidence(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) mean over heads of the top class's probability: low for images
        unlike the clinic's (a cheap out-of-distribution hint, not a detector)."""
        return torch.stack([p.max(1).values for p in self.probabilities(images).values()]).mean(0)


def save_classifier(model: AttributeClassifier, folder: str | Path, metrics: dict | None = None,
                    name: str = "attribute_classifier") -> None:
    """``folder/<name>.safetensors`` and ``folder/<name>.json``, written atomically."""
    from common.io import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    atomic_save_safetensors(folder / f"{name}.safetensors", model.state_dict())
    atomic_write_json(folder / f"{name}.json", {
        "width": model.width, "convs_per_block": model.convs_per_block, "stem_stride": model.stem_stride,
        "heads": model.head_labels, "metrics": metrics or {},
    })


def load_classifier(folder: str | Path, name: str = "attribute_classifier") -> AttributeClassifier:
    """The classifier saved as ``folder/<name>.*`` (``name="attribute_judge"`` for the judge)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / f"{name}.json").read_text())
    model = AttributeClassifier(meta["width"], heads=meta.get("heads", HEADS),
                                convs_per_block=meta.get("convs_per_block", 2), stem_stride=meta.get("stem_stride", 1))
    model.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    return model.eval()
