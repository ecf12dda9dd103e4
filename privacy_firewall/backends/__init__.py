"""Flow-model backends, registered by name: ``embedded`` (default, shipped),
``sd3`` and ``flux`` (local weights), and any module added to this package
(:mod:`privacy_firewall.backends.registry`)."""

from __future__ import annotations

from privacy_firewall.backends.base import BackendSettings, Conditioning, FlowBackend, RandomArchitecture
from privacy_firewall.backends.registry import (
    backend_class,
    backend_settings,
    load_backend,
    random_architectures,
    register_backend,
    registered_backends,
)

__all__ = [
    "BackendSettings", "Conditioning", "FlowBackend", "RandomArchitecture", "backend_class", "backend_settings",
    "load_backend", "random_architectures", "register_backend", "registered_backends",
]
