"""The run's configuration: the federation's own settings, and the whole composed.

``conf/`` holds every value once. This module composes the whole of it
(``conf/config.yaml``); each package types and checks its own part:
``firewall`` -> :class:`privacy_firewall.settings.FirewallSettings`, ``model`` ->
:class:`models.segmentation.SegmentationSettings`; the data, federation, paths and
sweep settings belong to the Flower apps and are defined here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import config as common_config
from common.config import ConfigError, check_choice, check_positive, parse_overrides, typed
from common.seeds import HELD_OUT_CLINIC_SEED
from models.segmentation import SegmentationSettings
from privacy_firewall.settings import MOVED_KEYS, FirewallSettings, firewall_settings

__all__ = [
    "STRATEGY_SETTINGS", "ConfigError", "DataSettings", "DifferentialPrivacySettings", "FedAdamSettings",
    "FedAvgSettings", "FedProxSettings", "FederationSettings", "RunConfig", "StrategySettings", "compose",
    "load_flower_run_config", "load_run_config", "load_saved_config", "parse_overrides", "strategy_settings",
]


@dataclass
class DataSettings:
    """Where the hospitals' photos come from (``conf/data/*.yaml``)."""

    source: str  # synthetic | folder
    # Which synthetic world the hospitals and the held-out originals come from:
    # hospital (presentations public data lacks) or public (what anyone can render).
    world: str
    clinic_seed: int
    num_subjects: int
    image_size: int
    holdout_subjects: int
    holdout_seed: int
    folder: Optional[str]
    val_fraction: float
    # Which masks the hospitals train with: differential (the firewall's, the
    # default), ground_truth (the synthetic clinic's, an upper bound), or
    # colour_rule (a single-image a* threshold, the zero-shot baseline).
    label_source: str

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("synthetic", "folder"))
        check_choice("data.world", self.world, ("hospital", "public"))
        if self.source == "folder" and not self.folder:
            raise ConfigError("data.source=folder needs data.folder=/path/to/hospital/data")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        check_positive("data.num_subjects", self.num_subjects)
        check_positive("data.holdout_subjects", self.holdout_subjects, allow_zero=True)
        if self.image_size < 32:
            raise ConfigError(f"data.image_size={self.image_size} must be at least 32")
        check_choice("data.label_source", self.label_source, ("differential", "reference", "ground_truth", "colour_rule"))
        if self.label_source == "ground_truth" and self.source != "synthetic":
            raise ConfigError("data.label_source=ground_truth needs data.source=synthetic (real photos have no truth)")


@dataclass
class ClientResources:
    num_cpus: int
    num_gpus: float


@dataclass
class DifferentialPrivacySettings:
    """Differential privacy (``federation.dp``): Flower's hospital-level DP around
    the strategy, or patient-level DP-SGD inside each hospital's training (``patient``)."""

    mode: str  # off | client-fixed | client-adaptive | server-fixed | server-adaptive | patient
    noise_multiplier: float  # Flower's on the average; patient: DP-SGD's on each step (unless target_epsilon)
    clipping_norm: float  # initial norm for adaptive clipping
    delta: float  # of the (epsilon, delta) reported per round; patient: capped at 1 / the hospital's patients
    # patient mode only: the noise for this epsilon over the planned rounds x local
    # epochs instead of noise_multiplier; the per-sample clipping norm; the budget
    # past which a hospital refuses to train (null: none).
    target_epsilon: Optional[float]
    max_grad_norm: float
    max_epsilon: Optional[float]

    def __post_init__(self) -> None:
        check_choice("federation.dp.mode", self.mode,
                ("off", "client-fixed", "client-adaptive", "server-fixed", "server-adaptive", "patient"))
        check_positive("federation.dp.noise_multiplier", self.noise_multiplier, allow_zero=True)
        if not math.isfinite(self.noise_multiplier):
            raise ConfigError(f"federation.dp.noise_multiplier={self.noise_multiplier} must be a finite number")
        check_positive("federation.dp.clipping_norm", self.clipping_norm)
        if not 0 < self.delta < 1:
            raise ConfigError(f"federation.dp.delta={self.delta} must be in (0, 1)")
        check_positive("federation.dp.max_grad_norm", self.max_grad_norm)
        for name in ("target_epsilon", "max_epsilon"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise ConfigError(f"federation.dp.{name}={value} must be a number > 0, or null")
        for name in ("target_epsilon", "max_epsilon"):
            if self.mode != "patient" and getattr(self, name) is not None:
                raise ConfigError(f"federation.dp.{name} applies to federation.dp.mode=patient only "
                                  f"(mode is {self.mode}); set it to null")
        if self.mode == "patient" and self.target_epsilon is None and self.noise_multiplier <= 0:
            raise ConfigError("federation.dp.mode=patient needs federation.dp.noise_multiplier > 0 "
                              "or federation.dp.target_epsilon")
        if (self.target_epsilon is not None and self.max_epsilon is not None
                and self.max_epsilon < self.target_epsilon):
            raise ConfigError(f"federation.dp.max_epsilon={self.max_epsilon} is below "
                              f"federation.dp.target_epsilon={self.target_epsilon}: the run could never finish")


# ----------------------------------------------------------------------------- strategies
# Each strategy the server can run has a name (``federation.strategy``) and its
# own settings (``federation.strategies.<name>``), typed and checked here; the
# class that runs it (server/strategy.py) is registered under the same name.
@dataclass(frozen=True)
class FedAvgSettings:
    """FedAvg (McMahan et al. 2017): the average of the hospitals' models weighted
    by their training pairs; nothing to set."""

    name: ClassVar[str] = "fedavg"
    #: Why patient-level DP cannot run with this strategy (None: it can).
    patient_dp_conflict: ClassVar[Optional[str]] = None


@dataclass(frozen=True)
class FedProxSettings:
    """FedProx (Li et al. 2020): each hospital adds ``proximal_mu / 2 ||w - w_global||^2``
    to its loss, pulling its model towards the global one."""

    proximal_mu: float

    name: ClassVar[str] = "fedprox"
    # Opacus noises the per-sample loss gradients only: a proximal term would go unaccounted.
    patient_dp_conflict: ClassVar[Optional[str]] = "DP-SGD would leave its proximal term out of the accounting"

    def __post_init__(self) -> None:
        if not self.proximal_mu > 0 or not math.isfinite(self.proximal_mu):
            raise ConfigError(f"federation.strategies.fedprox.proximal_mu={self.proximal_mu} must be a number > 0 "
                              "(0 is plain FedAvg: use federation.strategy=fedavg)")


@dataclass(frozen=True)
class FedAdamSettings:
    """FedAdam (Reddi et al. 2021): the server treats the hospitals' average update
    as a gradient for Adam with learning rate ``eta``, moment decays ``beta_1`` and
    ``beta_2`` and adaptivity ``tau``. (The hospitals' own learning rate is
    ``model.learning_rate``: flwr's ``eta_l`` is not used.)"""

    eta: float
    beta_1: float
    beta_2: float
    tau: float

    name: ClassVar[str] = "fedadam"
    patient_dp_conflict: ClassVar[Optional[str]] = None

    def __post_init__(self) -> None:
        for key in ("eta", "tau"):
            value = getattr(self, key)
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"federation.strategies.fedadam.{key}={value} must be a number > 0")
        for key in ("beta_1", "beta_2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"federation.strategies.fedadam.{key}={getattr(self, key)} must be in [0, 1)")


StrategySettings = Union[FedAvgSettings, FedProxSettings, FedAdamSettings]
#: The registered strategies' settings, by name (``federation.strategy``).
STRATEGY_SETTINGS: dict[str, type] = {s.name: s for s in (FedAvgSettings, FedProxSettings, FedAdamSettings)}
#: Earlier spellings of two strategy settings, still read (a saved run's
#: config.yaml, old overrides): ``federation.<key>`` -> ``federation.strategies.<name>.<key>``.
STRATEGY_ALIASES: dict[str, tuple[str, str]] = {
    "proximal_mu": ("fedprox", "proximal_mu"),
    "server_learning_rate": ("fedadam", "eta"),
}


def strategy_settings(name: str, sections: Mapping[str, Any]) -> StrategySettings:
    """The settings of strategy ``name``, every given section of
    ``federation.strategies`` typed and checked; a ConfigError listing the
    registered strategies for a name that is none of them."""
    registered = ", ".join(sorted(STRATEGY_SETTINGS))
    if name not in STRATEGY_SETTINGS:
        raise ConfigError(f"federation.strategy={name!r} is not a registered strategy; registered: {registered}")
    unknown = sorted(set(sections) - set(STRATEGY_SETTINGS))
    if unknown:
        raise ConfigError(f"federation.strategies.{unknown[0]} is not a registered strategy; registered: {registered}")
    typed_sections = {key: typed(STRATEGY_SETTINGS[key], sections[key] or {}, f"federation.strategies.{key}")
                      for key in sections}
    if name not in typed_sections:
        typed_sections[name] = typed(STRATEGY_SETTINGS[name], {}, f"federation.strategies.{name}")
    return typed_sections[name]


@dataclass
class FederationSettings:
    """The federation (``conf/federation/default.yaml``)."""

    # Hospitals: null = as many as Flower started (the simulation's num-supernodes,
    # each node's num-partitions); a number fixes it (checked against the nodes).
    num_hospitals: Optional[int]
    num_rounds: int
    strategy: str  # a name of STRATEGY_SETTINGS
    strategies: dict[str, Any]  # each strategy's own settings, by name
    # STRATEGY_ALIASES: folded into ``strategies`` when given (null: not given).
    proximal_mu: Optional[float]
    server_learning_rate: Optional[float]
    fraction_train: float
    fraction_evaluate: float
    # Hospitals that must answer for a round to count: a number, or "majority".
    min_available_hospitals: Any
    partitioning: str
    skew_by: list[str]
    dirichlet_alpha: float
    client_resources: ClientResources
    round_timeout: float
    connect_timeout: float
    prepare_timeout: float
    resume: Optional[str]
    device: str
    dp: DifferentialPrivacySettings

    def __post_init__(self) -> None:
        if self.num_hospitals is not None:
            check_positive("federation.num_hospitals", self.num_hospitals)
        check_positive("federation.num_rounds", self.num_rounds)
        self._fold_strategy_aliases()
        #: The chosen strategy's typed settings (server/strategy.py builds it from them).
        self.strategy_settings: StrategySettings = strategy_settings(self.strategy, self.strategies)
        check_choice("federation.partitioning", self.partitioning, ("dirichlet", "iid"))
        check_positive("federation.dirichlet_alpha", self.dirichlet_alpha)
        for key in self.skew_by:
            check_choice("federation.skew_by entry", key, ("presentation", "skin_tone_group", "view", "sex"))
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"federation.{name}={getattr(self, name)} must be in [0, 1]")
        check_positive("federation.round_timeout", self.round_timeout)
        check_positive("federation.connect_timeout", self.connect_timeout)
        check_positive("federation.prepare_timeout", self.prepare_timeout)
        check_positive("federation.client_resources.num_cpus", self.client_resources.num_cpus)
        check_positive("federation.client_resources.num_gpus", self.client_resources.num_gpus, allow_zero=True)
        check_choice("federation.device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        conflict = type(self.strategy_settings).patient_dp_conflict
        if self.dp.mode == "patient" and conflict:
            usable = ", ".join(n for n, s in sorted(STRATEGY_SETTINGS.items()) if not s.patient_dp_conflict)
            raise ConfigError(f"federation.dp.mode=patient does not support federation.strategy={self.strategy} "
                              f"({conflict}): use {usable}")
        m = self.min_available_hospitals
        if m != "majority":
            try:
                m = int(m)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"federation.min_available_hospitals={m!r}: give a number of hospitals or majority"
                ) from None
            if m < 1 or (self.num_hospitals is not None and m > self.num_hospitals):
                raise ConfigError(
                    f"federation.min_available_hospitals={m} must be between 1 and the number of hospitals "
                    f"({self.num_hospitals if self.num_hospitals is not None else 'as many as connect'}), or majority"
                )
            self.min_available_hospitals = m

    def _fold_strategy_aliases(self) -> None:
        """An earlier spelling that was given wins over the section's value (a saved
        run's config.yaml has only the old key), and is cleared: the resolved
        configuration keeps each value in one place."""
        sections = {name: dict(section or {}) for name, section in (self.strategies or {}).items()}
        for old, (name, key) in STRATEGY_ALIASES.items():
            value = getattr(self, old)
            if value is not None:
                sections.setdefault(name, {})[key] = value
                setattr(self, old, None)
        self.strategies = sections

    def required_hospitals(self, connected: int) -> int:
        """Hospitals needed for a round, out of ``connected`` (or num_hospitals)."""
        total = self.num_hospitals or connected
        if self.min_available_hospitals == "majority":
            return max(1, total // 2 + 1)
        return min(int(self.min_available_hospitals), max(total, 1))


@dataclass
class PathsSettings:
    home: str
    runs: str


@dataclass
class SweepSettings:
    eval_subjects: int
    eval_clinic_seed: Optional[int]  # null: the held-out clinic (common.seeds.HELD_OUT_CLINIC_SEED)

    def __post_init__(self) -> None:
        check_positive("sweep.eval_subjects", self.eval_subjects, allow_zero=True)
        if self.eval_clinic_seed is None:
            self.eval_clinic_seed = HELD_OUT_CLINIC_SEED


@dataclass
class RunConfig:
    """Everything a federated run reads, each part typed by its owner."""

    firewall: FirewallSettings
    model: SegmentationSettings
    data: DataSettings
    federation: FederationSettings
    seed: int
    paths: PathsSettings
    sweep: SweepSettings

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (saved with every run)."""
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)  # type: ignore[return-value]

    def with_hospitals(self, count: int) -> RunConfig:
        """This configuration with ``federation.num_hospitals`` fixed to ``count``."""
        from dataclasses import replace

        return replace(self, federation=replace(self.federation, num_hospitals=int(count)))


#: The parts of ``conf/`` a federated run reads (skinfed-run, flwr run,
#: skinfed-audit): all but the sweeps' own ``sweep.*`` (and the shared paths).
RUN_PARTS = ("firewall", "backend", "model", "data", "federation", "seed")


def compose(overrides: str | list[str] | None = None) -> DictConfig:
    """The whole ``conf/config.yaml`` with ``overrides`` applied (a moved key is
    named with its new place)."""
    return common_config.compose("config", overrides, MOVED_KEYS)


def run_config(composed: DictConfig) -> RunConfig:
    """A composed ``conf/`` typed and checked, part by part."""
    try:
        extra = set(composed.keys()) - {"firewall", "model", "data", "federation", "seed", "paths", "sweep", "hydra"}
        if extra:
            raise ConfigError(f"unknown top-level configuration key(s): {', '.join(sorted(extra))}")
        return RunConfig(
            firewall=firewall_settings(composed),
            model=typed(SegmentationSettings, composed.model, "model"),
            data=typed(DataSettings, composed.data, "data"),
            federation=typed(FederationSettings, composed.federation, "federation"),
            seed=int(composed.seed),
            paths=typed(PathsSettings, composed.paths, "paths"),
            sweep=typed(SweepSettings, composed.sweep, "sweep"),
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad configuration: {str(exc).splitlines()[0]}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad configuration: {exc}") from None


def load_run_config(overrides: str | list[str] | None = None) -> RunConfig:
    """The run's configuration with ``overrides`` applied, typed and checked."""
    return run_config(compose(overrides))


def load_flower_run_config(run_config_record: Any = None) -> RunConfig:
    """The configuration of a Flower run: ``$SKINFED_OVERRIDES`` (for containers
    and tests), then the run config's ``overrides`` string (``flwr run .
    --run-config 'overrides="federation.num_rounds=5"'``), later ones winning."""
    overrides = parse_overrides(os.environ.get("SKINFED_OVERRIDES", ""))
    overrides += parse_overrides(str((run_config_record or {}).get("overrides", "") or ""))
    return load_run_config(overrides)


def load_saved_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run's saved ``config.yaml`` (plus ``key=value`` overrides); the paths are
    this machine's, and a setting the run's version did not have yet takes its
    default from the current ``conf/``."""
    try:
        loaded = OmegaConf.load(path)
        # The run's own backend: each backend types firewall.backend with its own settings.
        backend = OmegaConf.select(loaded, "firewall.backend.name", default=None)
        current = compose([f"backend={backend}"] if backend else [])
        if backend and OmegaConf.select(loaded, "firewall.backend") is not None:
            # Keys the backend's settings no longer have (an older run's) are dropped, not refused.
            known = set(current.firewall.backend.keys())
            loaded.firewall.backend = {k: v for k, v in loaded.firewall.backend.items() if k in known}
        saved = OmegaConf.merge(current, loaded)
        saved.paths = current.paths
        saved.firewall.cache_dir = current.firewall.cache_dir
        saved.firewall.key_file = current.firewall.key_file
        if overrides:
            saved = OmegaConf.merge(saved, OmegaConf.from_dotlist(parse_overrides(overrides)))
    except (OSError, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot read the saved configuration {path}: {exc}") from None
    return run_config(saved)
