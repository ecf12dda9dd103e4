"""Configuration plumbing every package shares: the error, the checks, composing
``conf/`` with Hydra, typing a node against a data class, and who owns which
part of ``conf/``.

Each package types and checks its own part (``privacy_firewall.settings``,
``models.segmentation``, ``skinfed.config``); this module knows no setting of
any of them.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration key or value that cannot be used, with what to do instead."""


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, allowed))}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def check_range(name: str, value: list, lowest: float, highest: float, example: str) -> None:
    """A [from, to] pair with lowest <= from <= to <= highest."""
    if len(value) != 2 or not lowest <= value[0] <= value[1] <= highest:
        raise ConfigError(f"{name}={list(value)}: give [from,to] with {lowest:g} <= from <= to <= {highest:g} "
                          f"(e.g. {name}={example})")


# ----------------------------------------------------------------------------- who owns what
#: The top-level parts of ``conf/`` and the program whose settings they are.
#: ``paths`` is shared: every program writes under ``paths.home``.
SETTING_OWNERS: dict[str, str] = {
    "firewall": "the privacy firewall (privacy-firewall)",
    "backend": "the privacy firewall (privacy-firewall)",
    "model": "the segmentation model (skinfed-run / flwr run)",
    "data": "the federation's data (skinfed-run / flwr run)",
    "federation": "the federation (skinfed-run / flwr run)",
    "seed": "the federation (skinfed-run / flwr run)",
    "sweep": "the sweeps (python -m experiments.sweep)",
}
SHARED_PARTS = ("paths", "hydra")


def override_key(item: str) -> str:
    """The dotted key of a ``key=value`` override (``+``/``~``/``++`` stripped)."""
    return item.split("=", 1)[0].lstrip("+~")


def foreign_override_error(item: str, program: str) -> str:
    """The one line that says whose setting ``item`` is."""
    key = override_key(item)
    owner = SETTING_OWNERS.get(key.split(".")[0], "another program")
    return f"{key} is a setting of {owner}, not of {program}"


def split_overrides(overrides: list[str], own: Collection[str]) -> tuple[list[str], list[str]]:
    """(``own``, foreign) overrides: an override is this program's when its top-level
    part is in ``own`` or shared (paths); anything else belongs to another program."""
    mine, foreign = [], []
    for item in overrides:
        part = override_key(item).split(".")[0]
        (mine if part in own or part in SHARED_PARTS else foreign).append(item)
    return mine, foreign


def parse_args_and_overrides(parser: Any, argv: list[str] | None) -> Any:
    """``parser.parse_args`` with Hydra's ``key=value`` overrides anywhere on the
    command line, also after an option of several values (``--arms a b
    federation.num_rounds=5``), which argparse alone would take for one of them.
    The overrides land in ``namespace.overrides``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if re.match(r"^[+~]{0,2}[\w.\[\]/@-]+=", a) or re.match(r"^~[\w.]+$", a)]
    rest = [a for a in argv if a not in overrides]
    namespace = parser.parse_args(rest)
    namespace.overrides = [*getattr(namespace, "overrides", []), *overrides]
    return namespace


def reject_foreign_overrides(overrides: list[str], own: Collection[str], program: str) -> None:
    """ConfigError naming the owner of the first override that is not ``program``'s
    own (``own``: its top-level parts of ``conf/``). Called before any work."""
    _, foreign = split_overrides(overrides, own)
    if foreign:
        raise ConfigError(foreign_override_error(foreign[0], program))


# ----------------------------------------------------------------------------- composing conf/
def conf_dir() -> Path:
    """The Hydra configuration folder: ``$SKINFED_CONF_DIR``, else ``conf/`` beside
    this package (a checkout, an editable install or a Flower app bundle)."""
    env = os.environ.get("SKINFED_CONF_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (folder / "config.yaml").is_file():
        raise ConfigError(
            f"no configuration at {folder} (config.yaml missing): run from a checkout of the project, "
            "or set SKINFED_CONF_DIR to its conf/ folder"
        )
    return folder


def parse_overrides(text: str | list[str] | None) -> list[str]:
    """Overrides as a list, from a list or one shell-quoted string."""
    if text is None:
        return []
    if isinstance(text, str):
        return shlex.split(text)
    return list(text)


def _moved_hint(item: str, moved_keys: Mapping[str, str]) -> str:
    key = override_key(item)
    for old, new in moved_keys.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return f" ({old.rstrip('.')} is now {new.rstrip('.')}: write {new + key[len(old):] if old.endswith('.') else new}=...)"
    return ""


def compose(config_name: str, overrides: str | list[str] | None = None,
            moved_keys: Mapping[str, str] | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra and apply ``overrides``
    (``key=value`` strings), interpolations resolved. ``moved_keys`` maps old keys
    to their new place, for a hint when an old one is used."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    items = parse_overrides(overrides)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. firewall.flowedit.n_max=20)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            composed = hydra_compose(config_name=config_name, overrides=items)
        # Each package types its own part: interpolations across parts
        # (${paths.home}) must be resolved while the whole is still together.
        OmegaConf.resolve(composed)
        return composed
    except (HydraException, OmegaConfBaseException) as exc:
        detail = str(exc).split("Config search path")[0].strip()
        hints = "".join(_moved_hint(i, moved_keys or {}) for i in items)
        if hints:  # Hydra's "to append use +key" advice would mislead here
            detail = detail.splitlines()[0]
        raise ConfigError(f"bad configuration override: {detail}{hints}") from None


def typed(schema: type, node: Any, where: str) -> Any:
    """``node`` checked against the data class ``schema`` (unknown keys, wrong
    types, bad values) and turned into it."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        msg = str(exc).split("\n")[0]
        key = getattr(exc, "full_key", None)
        at = f"{where}.{key}" if key else where
        raise ConfigError(f"bad configuration at {at}: {msg}") from None
