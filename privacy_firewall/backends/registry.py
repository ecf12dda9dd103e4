"""Flow-model backends by name: one module in this package and one YAML each.

A backend module (conventionally ``privacy_firewall/backends/<name>.py``)
defines a :class:`~privacy_firewall.backends.base.FlowBackend` subclass with a
``name``, a ``settings_class`` (a :class:`~privacy_firewall.backends.base.BackendSettings`
dataclass: the fields it reads and their defaults) and ``from_settings``, and
registers it::

    @register_backend
    class ToyBackend(FlowBackend):
        name = "toy"
        settings_class = ToySettings

``conf/backend/<name>.yaml`` then selects it (``backend=toy``) and holds its
FlowEdit defaults. Nothing else names the backend: the modules of this package
are found on its ``__path__`` and imported when a name is first asked for
(:func:`backend_class`), the backend's settings class types and checks the
``firewall.backend`` mapping (:func:`backend_settings`), and
:func:`store_config_schemas` gives Hydra every settings class, so that each of
its fields can be overridden as ``firewall.backend.<field>=...`` although the
YAML lists only the values that differ from the defaults.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.config import ConfigError, typed
from privacy_firewall.backends.base import BackendSettings, FlowBackend

__all__ = [
    "SCHEMA_GROUP", "backend_class", "backend_settings", "check_backend_keys", "load_backend", "random_architectures",
    "register_backend", "registered_backends", "store_config_schemas",
]

log = logging.getLogger(__name__)

#: The Hydra ConfigStore group of the backends' settings classes; a backend's
#: YAML puts its own at ``firewall.backend`` (``- optional /backend_schema@backend: <name>``).
SCHEMA_GROUP = "backend_schema"

_BACKENDS: dict[str, type[FlowBackend]] = {}
#: Modules of the package that could not be imported: module name -> why.
_IMPORT_ERRORS: dict[str, str] = {}

HOW_TO_ADD = (
    "To add a backend, put a module in privacy_firewall/backends/ (e.g. backends/{name}.py) with a FlowBackend "
    "subclass decorated with @register_backend whose name is {name!r} and whose settings_class is a "
    "BackendSettings dataclass with `name: str = {name!r}`, and a conf/backend/{name}.yaml with its backend: "
    "and flowedit: defaults (docs/architecture.md, 'A new backend')"
)


# ----------------------------------------------------------------------------- registering
def register_backend(cls: type[FlowBackend]) -> type[FlowBackend]:
    """Class decorator: make ``cls`` the backend called ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, FlowBackend)):
        raise TypeError(f"@register_backend decorates a FlowBackend subclass, not {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name or name == FlowBackend.name:
        raise ValueError(f"{cls.__qualname__} needs a class attribute `name = \"...\"` (its backend's name) "
                         "to be registered")
    schema = cls.settings_class
    if not (is_dataclass(schema) and isinstance(schema, type) and issubclass(schema, BackendSettings)):
        raise TypeError(f"{cls.__qualname__}.settings_class must be a @dataclass subclass of BackendSettings, "
                        f"not {schema!r}")
    default = next(f.default for f in fields(schema) if f.name == "name")
    if default != name:
        shown = "no default" if default is MISSING else f"the default {default!r}"
        raise ValueError(f"{schema.__qualname__}.name has {shown} but {cls.__qualname__}.name is {name!r}: "
                         f"declare `name: str = {name!r}` in {schema.__qualname__}")
    known = _BACKENDS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"two backends are called {name!r}: {known.__module__}.{known.__qualname__} and "
                         f"{cls.__module__}.{cls.__qualname__}; rename one")
    _BACKENDS[name] = cls
    return cls


def _package_modules() -> list[str]:
    """The importable modules of this package, in every folder of its ``__path__``."""
    package = sys.modules[__package__]
    return sorted({info.name for info in pkgutil.iter_modules(package.__path__)
                   if not info.name.startswith("_") and info.name != "registry"})


def _import(module: str) -> None:
    qualified = f"{__package__}.{module}"
    if qualified in sys.modules:
        return
    try:
        importlib.import_module(qualified)
    except Exception as exc:  # noqa: BLE001 - one broken module must not hide the other backends
        _IMPORT_ERRORS[qualified] = f"{type(exc).__name__}: {exc}"
        log.warning("backend module %s could not be imported: %s", qualified, _IMPORT_ERRORS[qualified])
    else:
        _IMPORT_ERRORS.pop(qualified, None)


def _discover(name: str | None = None) -> None:
    """Import the package's modules not imported yet: only ``name``'s namesake
    when that registers ``name``, else all of them."""
    modules = _package_modules()
    if name is not None and name in modules:
        _import(name)
        if name in _BACKENDS:
            return
    for module in modules:
        _import(module)


def registered_backends() -> list[str]:
    """The names of the backends the package holds, sorted."""
    _discover()
    return sorted(_BACKENDS)


def backend_class(name: str, where: str = "firewall.backend") -> type[FlowBackend]:
    """The backend class called ``name``; a ConfigError listing the registered
    ones (and how to add one) when there is none."""
    if name not in _BACKENDS:
        _discover(name)
    if name in _BACKENDS:
        return _BACKENDS[name]
    broken = f"{__package__}.{name}"
    if broken in _IMPORT_ERRORS:
        raise ConfigError(f"{where}.name={name!r}: the backend's module {broken} could not be imported "
                          f"({_IMPORT_ERRORS[broken]}); fix it or choose one of: {', '.join(sorted(_BACKENDS))}")
    others = "".join(f"; {module} could not be imported ({why})" for module, why in sorted(_IMPORT_ERRORS.items()))
    raise ConfigError(f"{where}.name={name!r} is not a registered backend; the registered backends are: "
                      f"{', '.join(sorted(_BACKENDS))}{others}. {HOW_TO_ADD.format(name=name)}")


def random_architectures() -> dict[str, str]:
    """Every architecture some backend builds with random weights -> that backend's name
    (``benchmark --random-weights --architecture``)."""
    owners: dict[str, str] = {}
    for name in registered_backends():
        for architecture in _BACKENDS[name].random_architectures:
            if architecture in owners:
                raise ValueError(f"the random-weight architecture {architecture!r} is declared by both the "
                                 f"{owners[architecture]} and the {name} backends; rename one")
            owners[architecture] = name
    return owners


# ----------------------------------------------------------------------------- settings
def _unknown_key(where: str, key: str, name: str, schema: type[BackendSettings]) -> ConfigError:
    hint = schema.key_hints.get(key)
    known = ", ".join(f.name for f in fields(schema))
    return ConfigError(f"{where}.{key} is not a setting of the {name} backend" + (f" ({hint})" if hint else "")
                       + f"; its settings are: {known} ({schema.__module__}.{schema.__qualname__})")


def check_backend_keys(name: str, keys: list[str], where: str = "firewall.backend") -> None:
    """A ConfigError for the first of ``keys`` that the ``name`` backend does not have."""
    schema = backend_class(name, where).settings_class
    known = {f.name for f in fields(schema)}
    for key in keys:
        if key not in known:
            raise _unknown_key(where, key, name, schema)


def backend_settings(node: Any, where: str = "firewall.backend") -> BackendSettings:
    """``node`` (the ``firewall.backend`` mapping of a composed configuration, or a
    dict) typed and checked by the settings class of the backend it names."""
    if isinstance(node, BackendSettings):
        node = {f.name: getattr(node, f.name) for f in fields(node)}
    if isinstance(node, DictConfig):
        data = OmegaConf.to_container(node, resolve=True)
    elif isinstance(node, Mapping):
        data = dict(node)
    else:
        raise ConfigError(f"{where} must be a mapping that names its backend (name: embedded), not {node!r}")
    name = data.get("name")
    if name is None or name == "???":
        raise ConfigError(f"{where}.name is not set; choose one of: {', '.join(registered_backends())}")
    name = str(name)
    check_backend_keys(name, [str(k) for k in data], where)
    return typed(backend_class(name, where).settings_class, data, where)


def store_config_schemas() -> None:
    """Give Hydra's ConfigStore every backend's settings class (group
    :data:`SCHEMA_GROUP`, named after the backend), so the composed
    ``firewall.backend`` holds each field with its default. Cheap to repeat: a
    module added since is picked up."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in registered_backends():
        store.store(group=SCHEMA_GROUP, name=name, node=_BACKENDS[name].settings_class)


# ----------------------------------------------------------------------------- loading
def load_backend(settings: BackendSettings) -> FlowBackend:
    """Build the backend named by ``settings.name`` from ``settings``. Nothing is
    ever downloaded: pretrained weights come from a local folder or the offline
    Hugging Face cache."""
    cls = backend_class(settings.name)
    if not isinstance(settings, cls.settings_class):
        # Settings built by hand as the shared base: the backend's own defaults fill the rest.
        settings = backend_settings(settings)
    return cls.from_settings(settings)
