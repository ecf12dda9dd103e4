"""The project's configuration: Hydra composes ``conf/``, these data classes type it.

The YAML files in ``conf/`` hold every value (one place per setting); the data
classes below hold the types and the checks, so an unknown key or a bad value is
a clear :class:`ConfigError` whatever the entry point.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf as _conf_package

CONF_DIR = Path(_conf_package.__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration key or value that cannot be used, with what to do instead."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, allowed))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class BackendConfig:
    name: str
    model_path: Optional[str]
    dtype: str
    device: str
    drop_t5: bool
    vae_tiling: bool
    vae_slicing: bool
    cpu_offload: bool
    working_size: int
    steps: int
    n_max: int
    source_guidance: float
    target_guidance: float

    def __post_init__(self) -> None:
        _choice("backend.name", self.name, ("embedded", "sd3", "flux"))
        _choice("backend.dtype", self.dtype, ("fp32", "fp16", "bf16"))
        if self.name == "flux" and self.drop_t5:
            raise ConfigError("backend.drop_t5=true is only possible with sd3: FLUX needs its T5 encoder")
        _positive("backend.working_size", self.working_size)


@dataclass
class PromptsConfig:
    source: str
    target: str
    healthy: str
    original_healthy: str


@dataclass
class MaskConfig:
    signed: bool
    blur_sigma: float
    open_radius: int
    min_component_area: int
    threshold: Any  # float or "auto"
    default_threshold: float
    calibration_max: float
    calibration_step: float

    def __post_init__(self) -> None:
        if self.threshold != "auto":
            try:
                self.threshold = float(self.threshold)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"firewall.mask.threshold={self.threshold!r}: give a number (a* units) or auto"
                ) from None
        _positive("firewall.mask.blur_sigma", self.blur_sigma, allow_zero=True)
        _positive("firewall.mask.open_radius", self.open_radius, allow_zero=True)
        _positive("firewall.mask.min_component_area", self.min_component_area, allow_zero=True)
        _positive("firewall.mask.calibration_step", self.calibration_step)
        _positive("firewall.mask.calibration_max", self.calibration_max)


@dataclass
class FirewallConfig:
    steps: int
    n_max: int
    n_min: int
    n_avg: int
    source_guidance: float
    target_guidance: float
    guidance_mode: str
    mixed_source_guidance: float
    prompts: PromptsConfig
    source_sex: str
    fallback_target_sex: str
    original_healthy_twin: bool
    batch_size: int
    mask: MaskConfig
    min_output_std: float

    def __post_init__(self) -> None:
        _positive("firewall.steps", self.steps)
        if not 0 <= self.n_min <= self.n_max <= self.steps:
            raise ConfigError(
                f"need 0 <= firewall.n_min ({self.n_min}) <= firewall.n_max ({self.n_max}) "
                f"<= firewall.steps ({self.steps})"
            )
        _positive("firewall.n_avg", self.n_avg)
        _positive("firewall.batch_size", self.batch_size)
        _choice("firewall.guidance_mode", self.guidance_mode, ("cfg", "mixed"))
        _choice("firewall.source_sex", self.source_sex, ("auto", "woman", "man", "person"))
        _choice("firewall.fallback_target_sex", self.fallback_target_sex, ("woman", "man"))


@dataclass
class DataConfig:
    source: str
    clinic_seed: int
    num_subjects: int
    image_size: int
    holdout_subjects: int
    holdout_seed: int
    folder: Optional[str]
    val_fraction: float

    def __post_init__(self) -> None:
        _choice("data.source", self.source, ("synthetic", "folder"))
        if self.source == "folder" and not self.folder:
            raise ConfigError("data.source=folder needs data.folder=/path/to/hospital/data")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _positive("data.num_subjects", self.num_subjects)
        if self.image_size < 32:
            raise ConfigError(f"data.image_size={self.image_size} must be at least 32")


@dataclass
class ModelConfig:
    architecture: str
    encoder: str
    encoder_weights_path: Optional[str]
    encoder_depth: int
    decoder_channels: list[int]
    learning_rate: float
    local_epochs: int
    batch_size: int
    augment: bool
    dice_weight: float
    bce_weight: float

    def __post_init__(self) -> None:
        _choice("model.architecture", self.architecture, ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus"))
        _positive("model.learning_rate", self.learning_rate)
        _positive("model.local_epochs", self.local_epochs)
        _positive("model.batch_size", self.batch_size)
        if len(self.decoder_channels) != self.encoder_depth:
            raise ConfigError(
                f"model.decoder_channels has {len(self.decoder_channels)} entries; "
                f"it needs one per encoder level (model.encoder_depth={self.encoder_depth})"
            )


@dataclass
class ClientResources:
    num_cpus: int
    num_gpus: float


@dataclass
class FederationConfig:
    num_hospitals: int
    num_rounds: int
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    fraction_train: float
    fraction_evaluate: float
    min_available_hospitals: Optional[int]
    partitioning: str
    skew_by: list[str]
    dirichlet_alpha: float
    client_resources: ClientResources
    round_timeout: float
    connect_timeout: float
    resume: Optional[str]
    device: str

    def __post_init__(self) -> None:
        _positive("federation.num_hospitals", self.num_hospitals)
        _positive("federation.num_rounds", self.num_rounds)
        _choice("federation.strategy", self.strategy, ("fedavg", "fedprox", "fedadam"))
        _choice("federation.partitioning", self.partitioning, ("dirichlet", "iid"))
        _positive("federation.dirichlet_alpha", self.dirichlet_alpha)
        for key in self.skew_by:
            _choice("federation.skew_by entry", key, ("skin_tone_group", "view", "sex"))
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"federation.{name}={getattr(self, name)} must be in [0, 1]")
        _positive("federation.round_timeout", self.round_timeout)
        if self.min_available_hospitals is not None and not 1 <= self.min_available_hospitals <= self.num_hospitals:
            raise ConfigError(
                f"federation.min_available_hospitals={self.min_available_hospitals} must be between 1 and "
                f"federation.num_hospitals={self.num_hospitals} (or null for all)"
            )

    @property
    def required_hospitals(self) -> int:
        return self.min_available_hospitals or self.num_hospitals
        _positive("federation.client_resources.num_cpus", self.client_resources.num_cpus)
        _positive("federation.client_resources.num_gpus", self.client_resources.num_gpus, allow_zero=True)


@dataclass
class SweepConfig:
    eval_subjects: int
    eval_clinic_seed: int

    def __post_init__(self) -> None:
        _positive("sweep.eval_subjects", self.eval_subjects, allow_zero=True)


@dataclass
class PathsConfig:
    home: str
    firewall_cache: str
    runs: str


@dataclass
class Config:
    backend: BackendConfig
    firewall: FirewallConfig
    data: DataConfig
    model: ModelConfig
    federation: FederationConfig
    seed: int
    paths: PathsConfig = field(default_factory=lambda: PathsConfig("", "", ""))
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(16, 777))

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (saved with every run)."""
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)  # type: ignore[return-value]


def parse_overrides(text: str | list[str] | None) -> list[str]:
    """Overrides as a list, from a list or one shell-quoted string."""
    if text is None:
        return []
    if isinstance(text, str):
        return shlex.split(text)
    return list(text)


def compose(overrides: str | list[str] | None = None) -> DictConfig:
    """Compose ``conf/`` with Hydra and apply ``overrides`` (``key=value`` strings)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    items = parse_overrides(overrides)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. firewall.target_guidance=7)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=items)
    except (HydraException, OmegaConfBaseException) as exc:
        detail = str(exc).split("Config search path")[0].strip()
        raise ConfigError(f"bad configuration override: {detail}") from None


def to_config(cfg: DictConfig) -> Config:
    """Type-check a composed configuration (unknown keys, wrong types, bad values)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        msg = str(exc).split("\n")[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"bad configuration{f' at {key}' if key else ''}: {msg}") from None


def load_config(overrides: str | list[str] | None = None) -> Config:
    """The project's configuration with ``overrides`` applied, typed and checked."""
    return to_config(compose(overrides))


def load_run_config(run_config: Any = None) -> Config:
    """The configuration of a Flower run: ``$SKINFED_OVERRIDES`` (for containers
    and tests), then the run config's ``overrides`` string (``flwr run .
    --run-config 'overrides="federation.num_rounds=5"'``), later ones winning."""
    import os

    overrides = parse_overrides(os.environ.get("SKINFED_OVERRIDES", ""))
    overrides += parse_overrides(str((run_config or {}).get("overrides", "") or ""))
    return load_config(overrides)


def load_saved_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A run's saved ``config.yaml`` (plus ``key=value`` overrides); the paths are
    this machine's, from the current configuration."""
    try:
        saved = OmegaConf.load(path)
        saved.paths = compose([]).paths
        if overrides:
            saved = OmegaConf.merge(saved, OmegaConf.from_dotlist(parse_overrides(overrides)))
    except (OSError, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot read the saved configuration {path}: {exc}") from None
    return to_config(saved)
