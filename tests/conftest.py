"""Shared fixtures. Torch runs on one thread: with 2 cores, timings stall otherwise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_embedded_backend():
    """A random-weight embedded flow model at 16x16: real code path, tiny cost."""
    from models.flow_unet import FlowUNet, FlowUNetConfig
    from privacy_firewall.backends.embedded import EmbeddedBackend

    torch.manual_seed(0)
    model = FlowUNet(FlowUNetConfig(image_size=16, channels=(8, 16), blocks_per_level=1, attention_levels=(1,), embed_dim=16))
    # The output layer starts at zero; give it weights so velocities depend on the input.
    torch.nn.init.normal_(model.out.weight, std=0.1)
    return EmbeddedBackend(model)


@pytest.fixture(scope="session")
def tiny_embedded_dir(tmp_path_factory, tiny_embedded_backend):
    """The tiny random-weight embedded model saved as a weights folder
    (``firewall.backend.model_path``), with an untrained attribute classifier."""
    from models.attribute_classifier import AttributeClassifier, save_classifier
    from models.flow_unet import save_flow_unet

    folder = tmp_path_factory.mktemp("tiny_embedded")
    save_flow_unet(tiny_embedded_backend.model, folder)
    save_classifier(AttributeClassifier(width=8), folder, {})
    return folder


@pytest.fixture(scope="session")
def tiny_map_embedded_dir(tmp_path_factory):
    """A random-weight embedded model of version 2 at 16x16 (attribute slots and an
    erythema-map input): the firewall draws the new identity from the patient's map."""
    from models.attribute_classifier import AttributeClassifier, save_classifier
    from models.flow_unet import FlowUNet, FlowUNetConfig, save_flow_unet

    torch.manual_seed(0)
    model = FlowUNet(FlowUNetConfig(image_size=16, channels=(8, 16), blocks_per_level=1, attention_levels=(1,),
                                    embed_dim=16, conditioning="attribute_slots", slot_dim=4, spatial_channels=2))
    torch.nn.init.normal_(model.out.weight, std=0.1)
    folder = tmp_path_factory.mktemp("tiny_map_embedded")
    save_flow_unet(model, folder)
    save_classifier(AttributeClassifier(width=8), folder, {})
    return folder


#: Overrides that make every stage tiny: 16-px faces, 4 FlowEdit steps, a small U-Net.
TINY_OVERRIDES = [
    "firewall.flowedit.steps=4", "firewall.flowedit.n_max=3", "firewall.gate.matcher=none",
    "firewall.gate.require_matcher=false",
    "data.image_size=32", "data.num_subjects=12",
    "data.holdout_subjects=4", "model.encoder=resnet18", "model.encoder_depth=3",
    "model.decoder_channels=[16,8,4]", "model.local_epochs=1", "model.batch_size=8",
]


@pytest.fixture
def tiny_config(tmp_path, tiny_embedded_dir, monkeypatch):
    """A full run configuration on the tiny model, writing under ``tmp_path``."""
    from skinfed.config import load_run_config

    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    overrides = [f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES]
    return load_run_config(overrides), overrides


@pytest.fixture
def tiny_firewall_settings(tiny_config):
    """The tiny configuration's firewall settings."""
    return tiny_config[0].firewall


def make_hospital_folders(root: Path, per_hospital: int = 4, subfolder: str = "data") -> list[Path]:
    """Two hospital folders (``images/`` + ``metadata.csv``) from the synthetic
    clinic, as a hospital would hand them over (for the deployment tests)."""
    from synthetic_clinic.clinic import generate_clinic, read_metadata

    clinic = generate_clinic(root / "clinic", 2 * per_hospital, seed=0, size=32, progress=False)
    rows = read_metadata(clinic)
    folders = []
    for h in range(2):
        folder = root / subfolder / f"hospital_{h + 1}"
        (folder / "images").mkdir(parents=True)
        lines = ["stem,sex"]
        for row in rows[h * per_hospital:(h + 1) * per_hospital]:
            shutil.copyfile(clinic / "images" / f"{row['stem']}.png", folder / "images" / f"{row['stem']}.png")
            lines.append(f"{row['stem']},{row['sex']}")
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
        folders.append(folder)
    return folders
