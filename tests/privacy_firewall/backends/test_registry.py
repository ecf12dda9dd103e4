"""Backends by name: a backend is one module in privacy_firewall/backends/ and one
conf/backend/<name>.yaml, found without a list of names anywhere; its own
settings class types firewall.backend and refuses what the backend does not have."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml

import privacy_firewall.backends as backends_package
from common.config import conf_dir
from privacy_firewall.backends import (
    BackendSettings,
    FlowBackend,
    backend_class,
    backend_settings,
    load_backend,
    random_architectures,
    register_backend,
    registered_backends,
    registry,
)
from privacy_firewall.flowedit import flowedit
from privacy_firewall.settings import ConfigError, compose_firewall, load_firewall_settings

SHIPPED = ("embedded", "flux", "sd3")

#: The whole of a toy backend's module: settings with their defaults, loading, the model.
TOY_MODULE = '''
    """A toy backend: a linear velocity field, for the registry's tests."""

    from __future__ import annotations

    from dataclasses import dataclass

    import torch

    from privacy_firewall.backends.base import BackendSettings, Conditioning, FlowBackend
    from privacy_firewall.backends.registry import register_backend


    @dataclass
    class ToySettings(BackendSettings):
        name: str = "{name}"
        gain: float = 1.0
        offset: float = 0.0


    @register_backend
    class ToyBackend(FlowBackend):
        name = "{name}"
        settings_class = ToySettings
        native_size = 8
        size_multiple = 1

        def __init__(self, gain: float, offset: float) -> None:
            super().__init__()
            self.gain, self.offset = gain, offset

        @classmethod
        def from_settings(cls, settings: ToySettings) -> ToyBackend:
            return cls(settings.gain, settings.offset)

        def _encode_prompts(self, prompts: list[str]) -> Conditioning:
            return Conditioning(embeds=torch.tensor([[len(p) / 40.0] for p in prompts]), extras={{}})

        def _velocity(self, latents, t, cond, guidance):
            return self.gain * (latents - cond.embeds[:, :, None, None] - self.offset)

        def encode_images(self, images: torch.Tensor) -> torch.Tensor:
            return images * 2 - 1

        def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
            return ((latents + 1) / 2).clamp(0, 1)

        def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
            return torch.linspace(1.0, 0.0, num_steps + 1)
'''

#: The whole of its YAML: the schema line, its name, one value that differs from
#: the class default, and its FlowEdit defaults.
TOY_YAML = """
    # @package firewall
    defaults:
      - optional /backend_schema@backend: {name}
      - _self_
    backend:
      name: {name}
      gain: 0.5
    flowedit:
      steps: 4
      n_max: 3
      n_min: 0
      n_avg: 1
      source_guidance: 1.0
      target_guidance: 2.0
      guidance_mode: cfg
      mixed_source_guidance: 1.0
"""


@pytest.fixture
def extra_backend_folder(tmp_path, monkeypatch):
    """A folder that is part of privacy_firewall.backends (on the package's
    ``__path__``, as the package's own folder is), and a copy of conf/ to add a
    YAML to: what a user adds lands in the same places, without writing into
    the checkout. Registrations made here are undone afterwards."""
    folder = tmp_path / "backends"
    folder.mkdir()
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    monkeypatch.setattr(backends_package, "__path__", [*backends_package.__path__, str(folder)])
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", dict(registry._IMPORT_ERRORS))
    monkeypatch.setenv("SKINFED_CONF_DIR", str(conf))
    before = set(sys.modules)
    yield folder, conf
    for module in set(sys.modules) - before:
        if module.startswith("privacy_firewall.backends."):
            del sys.modules[module]


def _add_toy(folder: Path, conf: Path) -> str:
    name = f"toy_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(TOY_MODULE).format(name=name))
    (conf / "backend" / f"{name}.yaml").write_text(textwrap.dedent(TOY_YAML).format(name=name))
    return name


def test_a_new_backend_is_one_module_and_one_yaml(extra_backend_folder):
    folder, conf = extra_backend_folder
    name = _add_toy(folder, conf)
    assert name in registered_backends() and set(SHIPPED) <= set(registered_backends())

    # The YAML's value, the class default (offset), and an override of a key the
    # YAML does not list: each field of the class is composed.
    settings = load_firewall_settings([f"backend={name}", "firewall.backend.offset=0.25"])
    assert type(settings.backend).__name__ == "ToySettings"
    assert (settings.backend.name, settings.backend.gain, settings.backend.offset) == (name, 0.5, 0.25)
    assert (settings.backend.dtype, settings.backend.device) == ("fp32", "auto")  # the shared defaults
    assert settings.flowedit.steps == 4  # its FlowEdit defaults
    assert settings.to_dict()["backend"] == dataclasses.asdict(settings.backend)

    backend = load_backend(settings.backend)
    assert type(backend).__name__ == "ToyBackend" and (backend.gain, backend.offset) == (0.5, 0.25)
    x = backend.encode_images(torch.rand(2, 3, 8, 8))
    out = flowedit(backend, x, ["a face"] * 2, [["a face with erythema"]] * 2, settings.flowedit, [1, 2])
    assert out.latents.shape == (2, 1, 3, 8, 8) and torch.isfinite(out.latents).all()
    assert out.nfe_per_image > 0

    with pytest.raises(ConfigError) as err:
        load_firewall_settings([f"backend={name}", "firewall.backend.drop_t5=true"])
    assert f"firewall.backend.drop_t5 is not a setting of the {name} backend" in str(err.value)
    assert "gain" in str(err.value) and "offset" in str(err.value)  # its settings are listed


def test_a_backend_whose_module_fails_to_import_is_named(extra_backend_folder):
    folder, _ = extra_backend_folder
    broken = f"broken_{uuid.uuid4().hex[:8]}"
    (folder / f"{broken}.py").write_text("import no_such_package_xyz\n")
    assert set(SHIPPED) <= set(registered_backends())  # the others are still there
    with pytest.raises(ConfigError, match="no_such_package_xyz") as err:
        backend_class(broken)
    assert f"privacy_firewall.backends.{broken}" in str(err.value)


def test_an_unknown_backend_name_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        load_firewall_settings(["firewall.backend.name=nosuch"])
    message = str(err.value)
    assert "firewall.backend.name='nosuch'" in message
    assert all(name in message for name in SHIPPED)
    assert "privacy_firewall/backends/" in message and "conf/backend/nosuch.yaml" in message
    assert "@register_backend" in message
    with pytest.raises(ConfigError, match="nosuch"):
        load_backend(BackendSettings(name="nosuch"))


@pytest.mark.parametrize(("overrides", "words"), [
    (["backend=flux", "firewall.backend.drop_t5=true"], ["firewall.backend.drop_t5", "flux backend", "T5",
                                                          "max_sequence_length"]),
    (["+firewall.backend.vae_tiling=true"], ["firewall.backend.vae_tiling", "embedded backend"]),
    (["backend=sd3", "firewall.backend.drop_t5=maybe"], ["firewall.backend.drop_t5", "bool"]),
    (["backend=sd3", "firewall.backend.working_size=big"], ["firewall.backend.working_size", "Integer"]),
    (["backend=sd3", "firewall.backend.dtype=fp8"], ["firewall.backend.dtype", "fp16"]),
], ids=["flux_has_no_drop_t5", "embedded_has_no_vae", "bad_bool", "bad_int", "bad_choice"])
def test_what_the_chosen_backend_does_not_take_is_refused(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_firewall_settings(overrides)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_yaml_key_the_backend_does_not_have_is_refused():
    with pytest.raises(ConfigError, match="firewall.backend.nonsense is not a setting of the sd3 backend"):
        backend_settings({"name": "sd3", "nonsense": 1})
    with pytest.raises(ConfigError, match="firewall.backend.name is not set"):
        backend_settings({"dtype": "fp32"})


def test_every_key_of_each_backend_can_be_overridden():
    """The YAMLs list only what differs from the settings classes' defaults, and
    still every field is a plain key=value override, with both composers."""
    from skinfed.config import load_run_config

    for name in SHIPPED:
        schema = backend_class(name).settings_class
        composed = compose_firewall([f"backend={name}"]).firewall.backend
        assert set(composed) == {f.name for f in dataclasses.fields(schema)}, name
    assert load_firewall_settings(["backend=sd3", "firewall.backend.drop_t5=true"]).backend.drop_t5 is True
    run = load_run_config(["backend=flux", "firewall.backend.vae_tiling=true", "firewall.backend.device=cpu"])
    assert run.firewall.backend.vae_tiling is True and run.firewall.backend.device == "cpu"


def test_the_yamls_carry_only_values_that_differ_from_the_defaults():
    for path in sorted((conf_dir() / "backend").glob("*.yaml")):
        mapping = yaml.safe_load(path.read_text())["backend"]
        defaults = {f.name: f.default for f in dataclasses.fields(backend_class(mapping["name"]).settings_class)}
        assert path.stem == mapping["name"]
        for key, value in mapping.items():
            assert key in defaults, (path.name, key)
            assert key == "name" or value != defaults[key], f"{path.name}: {key}: {value} is the class default"


def test_random_architectures_are_the_backends_facts():
    owners = random_architectures()
    assert {a: owners[a] for a in ("tiny-sd3", "sd3-medium", "tiny-flux", "flux-dev", "embedded")} == {
        "tiny-sd3": "sd3", "sd3-medium": "sd3", "tiny-flux": "flux", "flux-dev": "flux", "embedded": "embedded"}
    for name in SHIPPED:
        first = next(iter(backend_class(name).random_architectures))  # the default one
        assert owners[first] == name


def test_register_backend_says_what_to_fix():
    @dataclasses.dataclass
    class WrongName(BackendSettings):
        name: str = "other"

    class Mismatched(FlowBackend):
        name = "mismatched"
        settings_class = WrongName

    with pytest.raises(ValueError, match="name: str = 'mismatched'"):
        register_backend(Mismatched)

    @dataclasses.dataclass
    class Sd3Again(BackendSettings):
        name: str = "sd3"

    class Duplicate(FlowBackend):
        name = "sd3"
        settings_class = Sd3Again

    with pytest.raises(ValueError, match="two backends are called 'sd3'"):
        register_backend(Duplicate)

    class Nameless(FlowBackend):
        pass

    with pytest.raises(ValueError, match="class attribute"):
        register_backend(Nameless)
    with pytest.raises(TypeError, match="FlowBackend subclass"):
        register_backend(WrongName)  # type: ignore[arg-type]
    assert "mismatched" not in registered_backends() and backend_class("sd3").__name__ == "SD3Backend"
