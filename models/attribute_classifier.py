"""A small CNN that reads the synthetic clinic's attributes back from an image.

It is the judge of the embedded firewall's evaluation: did FlowEdit flip the sex
(identity_flip_rate), does the surrogate still show erythema, has its healthy
twin lost it. It is trained on clinic images only and shipped with the embedded
flow model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: head name -> class labels
HEADS: dict[str, tuple[str, ...]] = {
    "sex": ("female", "male"),
    "erythema": ("absent", "present"),
    "skin_tone_group": ("light", "medium", "dark"),
    "view": ("full_face", "periocular"),
}


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.SiLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(labels)) for name, labels in HEADS.items()})
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] -> logits per head."""
        x = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        h = self.features(x * 2 - 1).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        logits = self.eval()(images)
        return {name: [HEADS[name][i] for i in lg.argmax(1).tolist()] for name, lg in logits.items()}


def save_classifier(model: AttributeClassifier, folder: str | Path, metrics: dict | None = None) -> None:
    from safetensors.torch import save_file

    from models.io import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    tmp = folder / ".attribute_classifier.partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_bytes(folder / "attribute_classifier.safetensors", tmp.read_bytes())
    tmp.unlink()
    atomic_write_json(folder / "attribute_classifier.json", {"width": model.width, "heads": HEADS, "metrics": metrics or {}})


def load_classifier(folder: str | Path) -> AttributeClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "attribute_classifier.json").read_text())
    model = AttributeClassifier(meta["width"])
    model.load_state_dict(load_file(str(folder / "attribute_classifier.safetensors")))
    return model.eval()
