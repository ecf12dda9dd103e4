"""privacy_firewall/cache.py: results stored once, whole or not at all."""

from __future__ import annotations

import numpy as np
import pytest

from privacy_firewall.cache import FirewallCache
from privacy_firewall.twins import TwinResult


def _result() -> TwinResult:
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)  # noqa: E731
    return TwinResult(status="ok", surrogate=img(), healthy_twin=img(), original=img(), original_healthy_twin=img(),
                      drawn_erythema_map=rng.random((6, 6)) > 0.5, source_sex="woman", target_sex="man",
                      identity=("red hair",), attempts=2, gate_distance=0.7, nfe=268.0, seconds=1.5)


def test_a_result_comes_back_as_it_was_stored(tmp_path):
    cache, res = FirewallCache(tmp_path), _result()
    cache.put("ab" * 32, res)
    got = cache.get("ab" * 32)
    assert got is not None and got.cached and got.ok
    for name in ("surrogate", "healthy_twin", "original", "original_healthy_twin", "drawn_erythema_map"):
        assert np.array_equal(getattr(got, name), getattr(res, name)), name
    assert (got.identity, got.attempts, got.nfe, got.target_sex) == (("red hair",), 2, 268.0, "man")
    assert set(got.files) == {"surrogate", "healthy_twin", "original", "original_healthy_twin"}


def test_failures_are_not_cached_and_a_broken_entry_is_a_miss(tmp_path):
    cache = FirewallCache(tmp_path)
    cache.put("cd" * 32, TwinResult(status="failed", reason="no"))
    assert cache.get("cd" * 32) is None and not any(tmp_path.rglob("meta.json"))
    cache.put("ef" * 32, _result())
    (tmp_path / "ef" / ("ef" * 32) / "surrogate.png").write_bytes(b"not a png")
    assert cache.get("ef" * 32) is None  # recomputed, never served half


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import privacy_firewall.cache as cache_module

    def killed(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.os, "rename", killed)
    cache = FirewallCache(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        cache.put("01" * 32, _result())
    assert cache.get("01" * 32) is None
    assert list((tmp_path / "01").iterdir()) == []  # nor a temporary folder
