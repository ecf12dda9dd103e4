"""Flow-model backends: ``embedded`` (default, shipped), ``sd3`` and ``flux`` (local weights)."""

from __future__ import annotations

from privacy_firewall.backends.base import Conditioning, FlowBackend

__all__ = ["Conditioning", "FlowBackend", "load_backend"]


def load_backend(backend_cfg) -> FlowBackend:
    """Build the backend named by ``backend_cfg.name`` (a BackendConfig). Nothing
    is ever downloaded: SD3/FLUX weights come from a local folder or the offline
    Hugging Face cache."""
    name = backend_cfg.name
    if name == "embedded":
        from privacy_firewall.backends.embedded import EmbeddedBackend

        return EmbeddedBackend.from_config(backend_cfg)
    if name == "sd3":
        from privacy_firewall.backends.sd3 import SD3Backend

        return SD3Backend.from_config(backend_cfg)
    if name == "flux":
        from privacy_firewall.backends.flux import FluxBackend

        return FluxBackend.from_config(backend_cfg)
    raise ValueError(f"unknown backend {name!r}: choose embedded, sd3 or flux")
