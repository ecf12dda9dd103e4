"""Atomic file writes now live in :mod:`common.io`; this name stays importable
for code written against the old place (new code imports ``common.io``)."""

from common.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
