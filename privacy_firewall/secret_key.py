"""The hospital's secret key: the only secret of the firewall.

The firewall's code and weights are public, so anything it derives from public
values (a seed in a config, the pixels of a photo) can be recomputed by anyone who
holds a candidate photo: a replayed edit is bit-identical to the surrogate. Every
random choice the firewall makes — the edit's noise, the new identity drawn for a
photo, the retries of the gate — is therefore an HMAC of the photo's pixel digest
under a per-hospital key that never leaves the node. The same key and photo give
the same result (the cache and a resumed run keep working); without the key
there is no replay. The hospital's training randomness is derived the same way
(:func:`derive_seed` with purpose ``"training"``), so the server cannot replay
local training either.

The key is 32 random bytes in a file created on first use with mode 0600. It is
never written into reports, configs, logs or the Flower app bundle. To rotate it,
move the file away: the next run makes a new key, and the cache (whose keys are
HMACs under the old key) is cold.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class SecretKeyError(RuntimeError):
    """The key file exists but cannot be used."""


def load_or_create_key(path: str | Path) -> bytes:
    """The key in ``path``; a new random one (mode 0600) if there is none."""
    path = Path(path).expanduser()
    if path.is_file():
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise SecretKeyError(
                f"the firewall key file {path} cannot be read ({type(exc).__name__}): restore it from the "
                "hospital's backup, or move it away to start with a new key (the firewall cache is then cold)"
            ) from None
        if len(key) < 16:
            raise SecretKeyError(f"the firewall key file {path} holds {len(key)} bytes; at least 16 are needed")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path.parent, 0o700)
    except OSError:
        pass
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        # Never replace a key another process made first: link fails if it exists.
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def keyed_digest(key: bytes, purpose: str, *parts: str) -> bytes:
    """HMAC-SHA256 of ``parts`` under ``key``, separated by purpose."""
    message = "\x1f".join((purpose, *parts)).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def derive_seed(key: bytes, purpose: str, *parts: str) -> int:
    """A 63-bit seed nobody without ``key`` can predict."""
    return int.from_bytes(keyed_digest(key, purpose, *parts)[:8], "big") >> 1


def key_fingerprint(key: bytes) -> str:
    """A short public name of a key (tells two keys apart, reveals nothing)."""
    return hashlib.sha256(b"skinfed-key-fingerprint" + key).hexdigest()[:12]
