"""Certificates and SuperNode keys for a Flower deployment (flwr 1.42), offline.

    python scripts/make_certificates.py deploy/certs                      # CA, SuperLink cert, 2 node key pairs
    python scripts/make_certificates.py deploy/certs --nodes 3 --san fl.example-hospital.org --san 10.1.2.3
    python scripts/make_certificates.py /etc/skinfed/keys --node-key-only hospital-3   # at a hospital: its key pair only
    sudo python scripts/make_certificates.py deploy/certs --owner 1000:1000           # as root: files for uid 1000

Writes into OUT_DIR (created if missing; existing files are kept unless --force):

| file | what | who gets it |
|---|---|---|
| ``ca.crt`` | the federation's root certificate (self-signed CA) | everybody: SuperLink, every SuperNode, the researcher's ``flwr`` CLI |
| ``ca.key`` | the CA's private key | nobody: keep it offline at the coordinator |
| ``superlink.crt``, ``superlink.key`` | the SuperLink's TLS certificate (SANs: localhost, 127.0.0.1, ::1, superlink and every ``--san``) and key | the SuperLink only |
| ``superlink.superexec-secret`` | shared secret (``--superexec-auth-secret-file``) of the SuperLink and its ServerApp SuperExec | the coordinator's two services |
| ``supernode-<i>``, ``supernode-<i>.pub`` | SuperNode ``i``'s authentication key pair (ECDSA P-384): the private key in OpenSSH format for ``flower-supernode --auth-supernode-private-key``, the public key in OpenSSH format for ``flwr supernode register`` | the private key stays at the hospital; the ``.pub`` goes to the coordinator |
| ``supernode-<i>.superexec-secret`` | shared secret of SuperNode ``i`` and its ClientApp SuperExec | hospital ``i``'s two services |

This is the format flwr 1.42 loads: ``flower-supernode`` reads the private key with
``cryptography``'s ``load_ssh_private_key`` and wants an elliptic-curve key;
``flwr supernode register`` reads the public key with ``load_ssh_public_key`` and
wants a NIST curve (P-384 here, as Flower's own examples use). The same files can
be made with OpenSSL and ``ssh-keygen -t ecdsa -b 384 -N ''``.

Private keys and secrets are written with mode 0600 (readable by their owner
only), and every file but ``ca.key`` is owned by ``--owner`` (default 1000:1000,
the uid the containers run as, the image's ``SKINFED_UID``), so the containers
can read what is mounted into them. Run as root, the files are chowned to it; run
as that user, nothing changes; run as any other user, the script refuses before
writing anything and says what to do (``sudo``, or ``--owner $(id -u):$(id -g)``
and an image built with ``SKINFED_UID=$(id -u)``). ``ca.key`` stays with the
user who ran the script: no container mounts it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names the SuperLink certificate always covers: loopback, and the compose service name.
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1", "superlink")
CURVE = ec.SECP384R1
#: The uid:gid the containers run as (the Dockerfile's SKINFED_UID/SKINFED_GID).
CONTAINER_OWNER = "1000:1000"

Owner = tuple[int, int]


class OwnerError(ValueError):
    """The files cannot be given to the requested owner."""


def parse_owner(text: str) -> Owner:
    """``UID:GID`` or ``UID`` (then GID = UID) as numbers."""
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise OwnerError(f"--owner {text!r}: give numbers, UID:GID (e.g. 1000:1000)") from None


def check_owner(owner: Owner | None) -> None:
    """OwnerError unless this process can make files owned by ``owner``."""
    if owner is None or os.geteuid() in (0, owner[0]):
        return
    raise OwnerError(
        f"the containers run as uid {owner[0]} but this script runs as uid {os.geteuid()} and cannot give files to "
        f"another user. Either run it with sudo (the files go to uid {owner[0]}), or keep them yours with "
        "--owner $(id -u):$(id -g) and build the image for your uid: "
        "SKINFED_UID=$(id -u) SKINFED_GID=$(id -g) docker-compose build")


def _write(path: Path, data: bytes, private: bool, force: bool, owner: Owner | None = None) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass --force to overwrite it (nodes already registered with the old "
                              "public keys must then be registered again)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if owner is not None and (os.stat(tmp).st_uid, os.stat(tmp).st_gid) != owner:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skinfed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("skinfed federation CA"))
        .issuer_name(_name("skinfed federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode's key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def make_secret() -> bytes:
    """A SuperExec shared secret: flwr reads the file as raw bytes, so no newline."""
    return secrets.token_hex(32).encode()


def write_node_keys(out: Path, name: str, force: bool, owner: Owner | None = None) -> list[Path]:
    """SuperNode ``name``'s key pair and the secret it shares with its ClientApp
    SuperExec, owned by ``owner`` (None: by whoever runs this)."""
    private, public = make_node_keys(name)
    files = [(out / name, private, True), (out / f"{name}.pub", public, False),
             (out / f"{name}.superexec-secret", make_secret(), True)]
    for path, data, private_file in files:
        _write(path, data, private=private_file, force=force, owner=owner)
    return [path for path, _, _ in files]


def write_all(out: Path, nodes: int, sans: list[str], days: int, force: bool,
              owner: Owner | None = None) -> list[Path]:
    """CA, SuperLink certificate and ``nodes`` SuperNode key pairs into ``out``;
    every file but ``ca.key`` owned by ``owner`` (None: by whoever runs this)."""
    names = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, names, days)
    pem = serialization.Encoding.PEM
    written = []
    for path, data, private in [
        (out / "ca.crt", ca_cert.public_bytes(pem), False),
        (out / "ca.key", _pem_key(ca_key), True),
        (out / "superlink.crt", server_cert.public_bytes(pem), False),
        (out / "superlink.key", _pem_key(server_key), True),
        (out / "superlink.superexec-secret", make_secret(), True),
    ]:
        _write(path, data, private, force, owner=None if path.name == "ca.key" else owner)
        written.append(path)
    for i in range(1, nodes + 1):
        written += write_node_keys(out, f"supernode-{i}", force, owner)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_certificates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make (default 2)")
    parser.add_argument("--san", action="append", default=[],
                        help="extra DNS name or IP address the SuperLink is reached at (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    parser.add_argument("--node-key-only", metavar="NAME",
                        help="make only NAME, NAME.pub and NAME.superexec-secret (at a hospital; no CA, no certificate)")
    parser.add_argument("--owner", default=CONTAINER_OWNER, metavar="UID:GID",
                        help=f"owner of the files the containers read (default {CONTAINER_OWNER}, the containers' "
                             "user); 'keep' leaves them to whoever runs this")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 0 or args.days < 1:
        parser.error("--nodes must be >= 0 and --days >= 1")
    try:
        owner = None if args.owner == "keep" else parse_owner(args.owner)
        check_owner(owner)
        if args.node_key_only:
            written = write_node_keys(args.out, args.node_key_only, args.force, owner)
        else:
            written = write_all(args.out, args.nodes, args.san, args.days, args.force, owner)
    except (FileExistsError, OwnerError) as exc:
        print(f"make_certificates: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
