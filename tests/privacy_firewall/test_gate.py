"""The firewall's privacy machinery: the secret key, new identities and the gate
that fails closed (on tiny models; with the shipped weights and real photos
through the entry points: test_fail_closed.py)."""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np
import pytest

from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
from privacy_firewall.gate import IdentityGate
from privacy_firewall.identity import draw_identity
from privacy_firewall.secret_key import derive_seed, load_or_create_key
from privacy_firewall.settings import load_firewall_settings
from synthetic_clinic import render_subject


def tiny_settings(tiny_embedded_dir, tmp_path, *extra):
    return load_firewall_settings([f"firewall.backend.model_path={tiny_embedded_dir}", "firewall.flowedit.steps=4",
                                   "firewall.flowedit.n_max=3", f"firewall.key_file={tmp_path / 'key'}",
                                   f"firewall.cache_dir={tmp_path / 'cache'}", "firewall.gate.matcher=none",
                                   "firewall.gate.require_matcher=false", *extra])


def test_the_key_is_private_stable_and_secret(tmp_path):
    key = load_or_create_key(tmp_path / "secrets" / "firewall.key")
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(tmp_path / "secrets" / "firewall.key").st_mode) == 0o600
    assert load_or_create_key(tmp_path / "secrets" / "firewall.key") == key  # the same key next time
    other = load_or_create_key(tmp_path / "other.key")
    assert other != key
    assert derive_seed(key, "noise", "abc", "0") == derive_seed(key, "noise", "abc", "0")
    assert derive_seed(key, "noise", "abc", "0") != derive_seed(other, "noise", "abc", "0")
    (tmp_path / "broken.key").write_text("not hex")
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_or_create_key(tmp_path / "broken.key")


def test_same_key_same_surrogate_other_key_no_replay(tiny_embedded_dir, tmp_path):
    """Replay needs the key: the open-source firewall with another key makes
    another surrogate from the same photo; the same key makes the same one."""
    photo = render_subject(5, 0, 16).pathological
    settings = tiny_settings(tiny_embedded_dir, tmp_path)
    mine = PrivacyFirewall(settings, use_cache=False).run([PhotoRequest(photo, "woman")])[0]
    again = PrivacyFirewall(settings, use_cache=False).run([PhotoRequest(photo, "woman")])[0]
    attacker = PrivacyFirewall(dataclasses.replace(settings, key_file=str(tmp_path / "attacker.key")),
                               use_cache=False).run([PhotoRequest(photo, "woman")])[0]
    assert mine.ok and again.ok and attacker.ok
    assert np.array_equal(mine.surrogate, again.surrogate)
    assert not np.array_equal(mine.surrogate, attacker.surrogate)
    # The cache key is an HMAC under the key: it names no photo without the key.
    fw_a = PrivacyFirewall(settings, use_cache=False)
    fw_b = PrivacyFirewall(dataclasses.replace(settings, key_file=str(tmp_path / "attacker.key")), use_cache=False)
    digest = PhotoRequest(photo).digest
    assert fw_a.cache_key(digest, "woman") != fw_b.cache_key(digest, "woman")
    assert digest not in fw_a.cache_key(digest, "woman")


def test_new_identities_are_drawn_independently_of_the_source():
    attributes = {"hair": ("black hair", "blond hair"), "facial_hair": ("clean-shaven", "a full beard")}
    drawn = [draw_identity(attributes, seed) for seed in range(400)]
    assert {d.sex for d in drawn} == {"woman", "man"}
    assert 0.35 < np.mean([d.sex == "woman" for d in drawn]) < 0.65
    assert 0.35 < np.mean(["blond hair" in d.phrases for d in drawn]) < 0.65
    assert not any(d.sex == "woman" and "a full beard" in d.phrases for d in drawn)
    assert draw_identity(attributes, 7) == draw_identity(attributes, 7)


class AlwaysLinked:
    """A matcher that links every surrogate to its source."""

    name = "test matcher"
    threshold = 0.5
    false_match_rate = 0.01

    def distances(self, sources, surrogates):
        return np.zeros(len(sources))


def test_the_gate_refuses_a_surrogate_still_linked_after_every_attempt(tiny_embedded_dir, tmp_path):
    settings = tiny_settings(tiny_embedded_dir, tmp_path, "firewall.identity.attempts=2")
    firewall = PrivacyFirewall(settings, use_cache=False)
    firewall.gate = IdentityGate(settings.gate, AlwaysLinked())
    calls = []
    real = firewall._edit_batch
    def recording(prepared, digests, sexes, attempt, kept):
        calls.append(attempt)
        return real(prepared, digests, sexes, attempt, kept)

    firewall._edit_batch = recording
    result = firewall.run([PhotoRequest(render_subject(5, 1, 16).pathological, "man")])[0]
    assert result.status == "failed" and "still identifiable" in result.reason and "after 2 identities" in result.reason
    assert result.surrogate is None and result.healthy_twin is None  # fail closed: no pixels
    assert calls == [0, 1]  # a new identity for each attempt


def test_no_matcher_means_no_surrogate_unless_a_person_says_so(tiny_embedded_dir, tmp_path):
    settings = tiny_settings(tiny_embedded_dir, tmp_path, "firewall.gate.require_matcher=true")
    result = PrivacyFirewall(settings, use_cache=False).run([PhotoRequest(render_subject(5, 2, 16).pathological)])[0]
    assert result.status == "failed" and "no identity matcher" in result.reason
