"""Flow-model backends: ``embedded`` (default, shipped), ``sd3`` and ``flux`` (local weights)."""

from __future__ import annotations

from privacy_firewall.backends.base import Conditioning, FlowBackend
from privacy_firewall.settings import BackendSettings

__all__ = ["Conditioning", "FlowBackend", "load_backend"]


def load_backend(settings: BackendSettings) -> FlowBackend:
    """Build the backend named by ``settings.name``. Nothing is ever downloaded:
    SD3/FLUX weights come from a local folder or the offline Hugging Face cache."""
    if settings.name == "embedded":
        from privacy_firewall.backends.embedded import EmbeddedBackend

        return EmbeddedBackend.from_settings(settings)
    if settings.name == "sd3":
        from privacy_firewall.backends.sd3 import SD3Backend

        return SD3Backend.from_settings(settings)
    if settings.name == "flux":
        from privacy_firewall.backends.flux import FluxBackend

        return FluxBackend.from_settings(settings)
    raise ValueError(f"unknown backend {settings.name!r}: choose embedded, sd3 or flux")
