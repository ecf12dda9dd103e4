"""The embedded flow model's shipped weights, and how to find them.

The Flower app bundle carries only source and config files, so when the app runs
from a bundle this folder holds no weights. They are then found through the
installed distribution (an editable or regular install of this project), or
through ``$SKINFED_EMBEDDED_WEIGHTS`` / ``backend.model_path``.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "skinfed"
WEIGHTS = "flow_unet.safetensors"


def _candidates(model_path: str | None) -> list[Path]:
    out: list[Path] = []
    if model_path:
        return [Path(model_path).expanduser()]
    if os.environ.get("SKINFED_EMBEDDED_WEIGHTS"):
        out.append(Path(os.environ["SKINFED_EMBEDDED_WEIGHTS"]).expanduser())
    out.append(Path(__file__).resolve().parent)
    try:
        dist = metadata.distribution(DISTRIBUTION)
        out.append(Path(str(dist.locate_file("models/embedded"))))
        direct = dist.read_text("direct_url.json")
        if direct:  # editable install: the source checkout
            url = json.loads(direct).get("url", "")
            if url.startswith("file://"):
                out.append(Path(unquote(urlparse(url).path)) / "models" / "embedded")
    except metadata.PackageNotFoundError:
        pass
    return out


def find_embedded_weights(model_path: str | None = None) -> Path:
    """The folder holding the embedded model's weights, or a clear error."""
    tried = _candidates(model_path)
    for folder in tried:
        if (folder / WEIGHTS).is_file() and (folder / "flow_unet.json").is_file():
            return folder
    raise FileNotFoundError(
        "the embedded flow model's weights were not found; looked in: "
        + ", ".join(str(p) for p in tried)
        + ". Install the project (`pip install -e .` from the repository, which ships "
        "models/embedded/flow_unet.safetensors), or set backend.model_path / "
        "$SKINFED_EMBEDDED_WEIGHTS to a folder with flow_unet.safetensors and flow_unet.json."
    )
