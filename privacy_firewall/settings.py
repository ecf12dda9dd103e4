"""The privacy firewall's settings: typed, checked once, owned by this package.

The values live in ``conf/`` (Hydra): ``conf/firewall/default.yaml`` for what every
backend shares, and one ``conf/backend/<name>.yaml`` per backend, which fills in
``firewall.backend`` and that backend's FlowEdit defaults ``firewall.flowedit``.
Each value has exactly one home there; these data classes hold the types and the
checks, so an unknown key or a bad value is a clear :class:`ConfigError`. The
``firewall.backend`` part is the backend's own: its settings class (declared in
its module, found by name through :mod:`privacy_firewall.backends.registry`) holds
its fields and their defaults, and the YAML gives only the values that differ.

The firewall composes and reads nothing else (``conf/privacy_firewall.yaml``:
its own groups and the shared ``paths``): no federation, model or data settings.
A project that embeds it (the Flower apps, ``skinfed.config``) composes the whole
``conf/`` and hands the ``firewall`` node to :func:`firewall_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config import (
    ConfigError,
    check_choice,
    check_positive,
    check_range,
    compose,
    override_key,
    parse_overrides,
    reject_foreign_overrides,
    typed,
)
from privacy_firewall.backends.base import BackendSettings
from privacy_firewall.backends.registry import backend_settings, store_config_schemas

__all__ = [
    "OWN_PARTS", "BackendSettings", "ConfigError", "FirewallSettings", "FlowEditSettings", "GateSettings",
    "IdentitySettings", "MaskSettings", "PromptSettings", "compose_firewall", "firewall_settings",
    "load_firewall_settings",
]


# ----------------------------------------------------------------------------- the settings
@dataclass
class FlowEditSettings:
    """FlowEdit (Kulikov et al.): the schedule window and the guidance of both branches.

    The defaults are the backend's (``conf/backend/<name>.yaml``); override them as
    ``firewall.flowedit.n_max=20``."""

    steps: int  # T, the schedule length
    n_max: int  # edit the last n_max of the T steps (higher = stronger edit)
    n_min: int  # the last n_min steps are plain sampling of the target
    n_avg: int  # noise draws averaged per step
    source_guidance: float  # CFG scale of the source branch
    target_guidance: float  # CFG scale of the target branch (gamma_tgt of eq. 1)
    guidance_mode: str  # cfg | mixed (the paper's eq. 1)
    mixed_source_guidance: float  # gamma_src of eq. 1, mixed mode only

    def __post_init__(self) -> None:
        check_positive("firewall.flowedit.steps", self.steps)
        if not 0 <= self.n_min <= self.n_max <= self.steps:
            raise ConfigError(
                f"need 0 <= firewall.flowedit.n_min ({self.n_min}) <= firewall.flowedit.n_max ({self.n_max}) "
                f"<= firewall.flowedit.steps ({self.steps})"
            )
        check_positive("firewall.flowedit.n_avg", self.n_avg)
        check_choice("firewall.flowedit.guidance_mode", self.guidance_mode, ("cfg", "mixed"))


@dataclass
class PromptSettings:
    """Prompt templates. ``{sex}`` is the source's sex word, ``{target_sex}`` the
    surrogate's, ``{identity}`` the sampled identity's attribute phrases (with a
    leading comma, empty in opposite_sex mode)."""

    source: str
    target: str
    healthy: str
    original_healthy: str


@dataclass
class IdentitySettings:
    """What the surrogate's identity is."""

    # new_identity: every attribute the backend can express is drawn at random
    # (from the hospital's secret key) for each photo; opposite_sex: the paper's
    # prompt-only sex swap (kept for comparison: it is NOT de-identification).
    mode: str
    # Backends that take an erythema map (the embedded model, version 2) draw the
    # new identity from noise with the patient's erythema map, so nothing of the
    # photo but its erythema reaches the surrogate (the patient's own healthy twin
    # is then always made: the map is its difference to the photo).
    use_erythema_map: bool
    # Threshold (a* units) of the patient's own differential mask M_orig that
    # becomes the erythema map.
    erythema_map_threshold: float
    # What of the patient's erythema the map keeps (the outline, size and number
    # of patches each single a patient out; skinfed-audit):
    #   redrawn: the patient's patches in a new number, size, direction, stretch
    #     and place, drawn from the hospital's secret key (masks.redraw_erythema_map);
    #   reshaped: the map with a secret mirror, scale, move and smooth bend
    #     (masks.reshape_erythema_map); keeps the size and number of patches;
    #   kept: the patient's own map (the paper's "same erythema").
    erythema_layout: str
    # The bend's largest shift, a fraction of the image side (redrawn and reshaped).
    reshape_displacement: float
    # reshaped: the largest move of the whole map, a fraction of the image side.
    reshape_shift: float
    # redrawn: how many patches [fewest, most], their total area [smallest,
    # largest] as a fraction of the image (log-uniform), and the box of the patch
    # centres [from, to] as a fraction of the side, on both axes.
    redraw_patches: list[int]
    redraw_area: list[float]
    redraw_region: list[float]
    # redrawn: where a patch goes. anywhere: a random point of redraw_region;
    # own_region: where the patient's own patch was (mirrored with it), moved by
    # up to redraw_jitter x the side, so the affected region is kept.
    redraw_placement: str
    redraw_jitter: float
    # Where the surrogate's erythema comes from (backends that take a map):
    #   generator: drawn by the model along the laid-out map (it looks as the
    #     model's training images showed erythema);
    #   patient: the patient's own erythema, relative to their own healthy skin
    #     (hue, strength, texture; privacy_firewall.appearance), laid out with the
    #     map and painted onto the new identity's healthy face, which is also the
    #     healthy twin. The new identity then keeps the patient's skin-tone group.
    erythema_appearance: str
    # A surrogate the gate still links to its source is redrawn with a new
    # identity this many times in all before the photo is refused.
    attempts: int

    def __post_init__(self) -> None:
        check_choice("firewall.identity.mode", self.mode, ("new_identity", "opposite_sex"))
        check_positive("firewall.identity.attempts", self.attempts)
        check_choice("firewall.identity.erythema_layout", self.erythema_layout, ("redrawn", "reshaped", "kept"))
        check_choice("firewall.identity.erythema_appearance", self.erythema_appearance, ("generator", "patient"))
        for name in ("reshape_displacement", "reshape_shift"):
            value = getattr(self, name)
            if not 0.0 <= value <= 0.5:
                raise ConfigError(f"firewall.identity.{name}={value}: a fraction of the image side in [0, 0.5] "
                                  "(e.g. 0.1)")
        check_range("firewall.identity.redraw_patches", self.redraw_patches, 1, 16, "[1,4]")
        check_range("firewall.identity.redraw_area", self.redraw_area, 1e-4, 1.0, "[0.02,0.2]")
        check_range("firewall.identity.redraw_region", self.redraw_region, 0.0, 1.0, "[0.25,0.75]")
        check_choice("firewall.identity.redraw_placement", self.redraw_placement, ("anywhere", "own_region"))
        if not 0.0 <= self.redraw_jitter <= 0.5:
            raise ConfigError(f"firewall.identity.redraw_jitter={self.redraw_jitter}: a fraction of the image side "
                              "in [0, 0.5] (e.g. 0.08)")


@dataclass
class GateSettings:
    """The per-image check that fails closed."""

    # auto: the backend's own identity matcher (embedded) or the dlib face
    # recogniser (real photos; `pip install 'skinfed[faces]'`); none: no check.
    matcher: str
    # With no matcher available: refuse every photo (true) or pass them with a
    # warning (false). Without a matcher nothing shows a surrogate is unlinkable.
    require_matcher: bool
    # Refuse photos the backend was not made for (the embedded model: anything
    # that is not a synthetic-clinic face, e.g. a real photo).
    out_of_distribution_check: bool

    def __post_init__(self) -> None:
        check_choice("firewall.gate.matcher", self.matcher, ("auto", "none"))


@dataclass
class MaskSettings:
    signed: bool  # redness increase only (a*_path - a*_healthy > theta)
    blur_sigma: float
    open_radius: int
    min_component_area: int
    threshold: Any  # a number (a* units) or "auto" (the calibrated theta*)
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
        check_positive("firewall.mask.blur_sigma", self.blur_sigma, allow_zero=True)
        check_positive("firewall.mask.open_radius", self.open_radius, allow_zero=True)
        check_positive("firewall.mask.min_component_area", self.min_component_area, allow_zero=True)
        check_positive("firewall.mask.calibration_step", self.calibration_step)
        check_positive("firewall.mask.calibration_max", self.calibration_max)


@dataclass
class FirewallSettings:
    backend: BackendSettings  # the named backend's own settings class (registry.backend_settings)
    flowedit: FlowEditSettings
    prompts: PromptSettings
    identity: IdentitySettings
    gate: GateSettings
    mask: MaskSettings
    source_sex: str  # auto | woman | man | person
    fallback_target_sex: str  # opposite_sex mode, when the source is "person"
    original_healthy_twin: bool
    batch_size: int
    min_output_std: float
    cache_dir: str  # content-addressed results, keyed by the secret key
    key_file: str  # the hospital's secret key (created on first use, 0600)

    def __post_init__(self) -> None:
        check_choice("firewall.source_sex", self.source_sex, ("auto", "woman", "man", "person"))
        check_choice("firewall.fallback_target_sex", self.fallback_target_sex, ("woman", "man"))
        check_positive("firewall.batch_size", self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- composing conf/
#: The firewall's own parts of ``conf/``: ``firewall.*`` and the ``backend`` group
#: (which fills ``firewall.backend`` and ``firewall.flowedit``). Every other part
#: belongs to another program (``common.config.SETTING_OWNERS``).
OWN_PARTS = ("firewall", "backend")
#: The firewall's primary config: its own groups and the shared ``paths``.
CONFIG_NAME = "privacy_firewall"

#: Keys that moved, with their new place (a hint in the error).
MOVED_KEYS = {
    "backend.": "firewall.backend.",
    "firewall.steps": "firewall.flowedit.steps",
    "firewall.n_max": "firewall.flowedit.n_max",
    "firewall.n_min": "firewall.flowedit.n_min",
    "firewall.n_avg": "firewall.flowedit.n_avg",
    "firewall.source_guidance": "firewall.flowedit.source_guidance",
    "firewall.target_guidance": "firewall.flowedit.target_guidance",
    "firewall.guidance_mode": "firewall.flowedit.guidance_mode",
    "firewall.mixed_source_guidance": "firewall.flowedit.mixed_source_guidance",
    # reshape_erythema=true/false became erythema_layout=reshaped/kept (redrawn is new).
    "firewall.identity.reshape_erythema": "firewall.identity.erythema_layout",
}


def compose_firewall(overrides: str | list[str] | None = None) -> DictConfig:
    """The firewall's part of ``conf/`` (``conf/privacy_firewall.yaml``: the
    firewall and backend groups and the shared paths) with ``overrides`` applied.
    Settings of other programs are not composed: an override of one is a
    ConfigError naming its owner; so is a ``firewall.backend.*`` key the chosen
    backend does not have, naming the backend and its keys."""
    items = parse_overrides(overrides)
    reject_foreign_overrides(items, OWN_PARTS, "privacy-firewall")
    store_config_schemas()  # a backend module added since this process started composes with its defaults too
    try:
        return compose(CONFIG_NAME, items, MOVED_KEYS)
    except ConfigError:
        _explain_backend_overrides(items)
        raise


def _explain_backend_overrides(items: list[str]) -> None:
    """Hydra refuses an override of a key the composed ``firewall.backend`` lacks
    (suggesting to append it) or a value of the wrong type, in its own words;
    the backend's settings class says which keys it has and what each takes.
    Composes again without those overrides, applies them to the backend's
    mapping and types that: its ConfigError, if any, is the one to show."""
    prefix = "firewall.backend."
    ours = [i for i in items if override_key(i).startswith(prefix) and not i.startswith("~")]
    if not ours:
        return
    try:
        node = compose(CONFIG_NAME, [i for i in items if i not in ours], MOVED_KEYS).firewall.backend
    except (ConfigError, OmegaConfBaseException):
        return  # the other overrides fail too: that error is the one to show
    try:
        given = OmegaConf.from_dotlist([i.lstrip("+")[len(prefix):] for i in ours])
        backend = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), given)
    except OmegaConfBaseException:
        return
    backend_settings(backend, "firewall.backend")


def firewall_settings(composed: DictConfig) -> FirewallSettings:
    """The ``firewall`` node of a composed configuration, typed and checked; its
    ``backend`` by the settings class of the backend it names."""
    try:
        node = composed.firewall
        backend_node = node.get("backend")
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad configuration: {str(exc).splitlines()[0]}") from None
    data = OmegaConf.to_container(node, resolve=True)
    data["backend"] = backend_settings(backend_node, "firewall.backend")
    return typed(FirewallSettings, data, "firewall")


def load_firewall_settings(overrides: str | list[str] | None = None) -> FirewallSettings:
    """The firewall's settings from ``conf/`` with ``overrides`` applied."""
    return firewall_settings(compose_firewall(overrides))


# Every program that composes conf/ imports this module first (the firewall's
# CLI, skinfed.config): the backends' settings classes must be in Hydra's
# ConfigStore by then, so that an override reaches a field the YAML leaves to
# its default.
store_config_schemas()
