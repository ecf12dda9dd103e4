"""Shared fixtures. Torch runs on one thread: with 2 cores, timings stall otherwise."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def calibrate_tiny_model(backend) -> dict:
    """The out-of-distribution calibration of a tiny random-weight model, made as
    the shipped one is (held-out clinic faces, prepared to the model's size), so
    that the firewall's check stays on in the tests that use it."""
    from privacy_firewall.backends.embedded import calibrate_out_of_distribution
    from privacy_firewall.images import prepare
    from synthetic_clinic import render_subject

    size = backend.working_size
    faces = [prepare(render_subject(777, i, 32).pathological, size, backend.size_multiple, True).pixels
             for i in range(8)]
    return calibrate_out_of_distribution(backend, faces)


def _save_calibration(backend, folder: Path) -> None:
    from privacy_firewall.backends.embedded import OOD_FILE

    (folder / OOD_FILE).write_text(json.dumps(calibrate_tiny_model(backend)))


@pytest.fixture(scope="session")
def tiny_embedded_backend():
    """A random-weight embedded flow model at 16x16: real code path, tiny cost."""
    from models.flow_unet import FlowUNet, FlowUNetConfig
    from privacy_firewall.backends.embedded import EmbeddedBackend

    torch.manual_seed(0)
    model = FlowUNet(FlowUNetConfig(image_size=16, channels=(8, 16), blocks_per_level=1, attention_levels=(1,), embed_dim=16))
    # The output layer starts at zero; give it weights so velocities depend on the input.
    torch.nn.init.normal_(model.out.weight, std=0.1)
    backend = EmbeddedBackend(model)
    backend.ood_threshold = calibrate_tiny_model(backend)["threshold"]
    return backend


@pytest.fixture(scope="session")
def tiny_embedded_dir(tmp_path_factory, tiny_embedded_backend):
    """The tiny random-weight embedded model saved as a weights folder
    (``firewall.backend.model_path``), with an untrained attribute classifier and
    its out-of-distribution calibration."""
    from models.attribute_classifier import AttributeClassifier, save_classifier
    from models.flow_unet import save_flow_unet

    folder = tmp_path_factory.mktemp("tiny_embedded")
    save_flow_unet(tiny_embedded_backend.model, folder)
    save_classifier(AttributeClassifier(width=8), folder, {})
    _save_calibration(tiny_embedded_backend, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_map_embedded_dir(tmp_path_factory):
    """A random-weight embedded model of version 2 at 16x16 (attribute slots and an
    erythema-map input): the firewall draws the new identity from the patient's map."""
    from models.attribute_classifier import AttributeClassifier, save_classifier
    from models.flow_unet import FlowUNet, FlowUNetConfig, save_flow_unet
    from privacy_firewall.backends.embedded import EmbeddedBackend

    torch.manual_seed(0)
    model = FlowUNet(FlowUNetConfig(image_size=16, channels=(8, 16), blocks_per_level=1, attention_levels=(1,),
                                    embed_dim=16, conditioning="attribute_slots", slot_dim=4, spatial_channels=2))
    torch.nn.init.normal_(model.out.weight, std=0.1)
    folder = tmp_path_factory.mktemp("tiny_map_embedded")
    save_flow_unet(model, folder)
    save_classifier(AttributeClassifier(width=8), folder, {})
    _save_calibration(EmbeddedBackend(model), folder)
    return folder


#: The firewall's part of TINY_OVERRIDES (what `privacy-firewall` accepts). The
#: identity gate is off here because a random-weight 16-px model has no matcher
#: that could mean anything (dlib finds no face at 16 px and would refuse all):
#: these tests are about other things. The gate itself, on, with the shipped
#: weights and with dlib on real photos, is tested in test_fail_closed.py; the
#: out-of-distribution check stays on (the tiny models carry a calibration).
TINY_FIREWALL_OVERRIDES = [
    "firewall.flowedit.steps=4", "firewall.flowedit.n_max=3", "firewall.gate.matcher=none",
    "firewall.gate.require_matcher=false",
]

#: Overrides that make every stage tiny: 16-px faces, 4 FlowEdit steps, a small U-Net.
TINY_OVERRIDES = [
    *TINY_FIREWALL_OVERRIDES,
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
