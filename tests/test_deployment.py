"""The hospital deployment: Dockerfile, docker-compose.yml,
scripts/make_certificates.py and docs/deployment.md.

No Docker engine is needed: docker-compose.yml is validated against the Compose
Specification's JSON schema (tests/data/compose-spec.json) and checked for what
the deployment promises (TLS, node authentication, the photos seen only by each
hospital's network-less firewall service, ...), and the end-to-end test starts
the services of that very file as plain processes on 127.0.0.1: the commands,
flags, node config and environment are taken from docker-compose.yml and the
Dockerfile, with container paths mapped to folders under tmp_path and service
addresses to free local ports. tests/test_docker_stack.py (slow) runs the same
file under a real Docker engine.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from scripts import make_certificates
from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
HOSPITALS = ("1", "2")


# ----------------------------------------------------------------------------- reading the compose file
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` interpolation."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), value)


def _argv(service: dict) -> list[str]:
    entry = service.get("entrypoint") or []
    command = service.get("command") or []
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [str(x) for x in entry + command]


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _mounts(service: dict, env: dict[str, str] | None = None) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's volumes; a named volume's source is its name."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, dict):
            out.append((_interpolate(str(vol["source"]), env or {}), vol["target"], bool(vol.get("read_only"))))
            continue
        parts = _interpolate(vol, env or {}).split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _is_bind(source: str) -> bool:
    return source.startswith(("/", ".", "~"))


def _environment(service: dict, env: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: _interpolate(str(v), env) for k, v in raw.items()}


def _dockerfile_env() -> dict[str, str]:
    """The image's ENV, from the Dockerfile."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for item in shlex.split(line.strip()[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _roles(compose: dict) -> dict[str, list[str]]:
    """Service names by program: flower-superlink, flower-supernode, flower-superexec."""
    roles: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        roles.setdefault(Path(_argv(service)[0]).name, []).append(name)
    return roles


def _flwr_parsers():
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    return {"flower-superlink": _parse_args_run_superlink, "flower-supernode": _parse_args_run_supernode,
            "flower-superexec": superexec_parser}


def _program_parsers():
    """Every program the compose file runs: flwr's three and the firewall's CLI."""
    from privacy_firewall.cli import build_parser as firewall_parser

    return {**_flwr_parsers(), "privacy-firewall": firewall_parser}


def _watch_args(service: dict):
    """The parsed `privacy-firewall watch` command of a firewall service."""
    from privacy_firewall.cli import build_parser

    argv = _argv(service)
    assert Path(argv[0]).name == "privacy-firewall" and argv[1] == "watch", argv
    return build_parser().parse_args(argv[1:])


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _hospital_services() -> dict[str, tuple[str, str, str]]:
    """hospital number -> (its SuperNode, its ClientApp SuperExec, its firewall service)."""
    return {h: (f"supernode-{h}", f"clientapp-{h}", f"firewall-{h}") for h in HOSPITALS}


# ----------------------------------------------------------------------------- (a) the files
def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors
    # The schema is strict enough to catch mistakes.
    broken = _compose()
    broken["services"]["superlink"]["volume"] = []
    assert list(validator.iter_errors(broken))


def test_compose_services_use_the_image_and_flags_of_this_flwr():
    compose = _compose()
    roles = _roles(compose)
    assert roles == {
        "flower-superlink": ["superlink"],
        "flower-superexec": ["serverapp", "clientapp-1", "clientapp-2"],
        "flower-supernode": ["supernode-1", "supernode-2"],
        "privacy-firewall": ["firewall-1", "firewall-2"],
    }
    # Debian's docker-compose 1.29 rejects a top-level `name:`; `version:` is obsolete in both.
    assert "name" not in compose and "version" not in compose
    parsers = _program_parsers()
    for name, service in compose["services"].items():
        assert service["image"] == "skinfed:0.1.0", name
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert service.get("init") is True, f"{name}: SuperExec's app processes need an init to be reaped"
        argv = _argv(service)
        assert (BIN / argv[0]).is_file(), f"{name}: {argv[0]} is not a program of the installed flwr"
        parser = parsers[argv[0]]()
        try:
            parser.parse_args(argv[1:])  # every flag exists, every value is accepted
        except SystemExit:
            pytest.fail(f"{name}: {argv[0]} of flwr {_flwr_version()} rejects {argv[1:]}")
        deprecated = {opt for action in parser._actions for opt in action.option_strings
                      if "deprecated" in (action.help or "").lower()}
        used = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}
        assert not used & deprecated, f"{name} uses deprecated flags {used & deprecated}"
        # Files named on the command line are mounted into that container.
        targets = [t for _, t, _ in _mounts(service)]
        for arg in argv[1:]:
            value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
            if value.startswith("/certs/"):
                assert value in targets, f"{name}: {value} is not mounted"
    declared_volumes = set(compose.get("volumes", {}))
    declared_networks = set(compose.get("networks", {}))
    for name, service in compose["services"].items():
        for source, _, _ in _mounts(service):
            assert _is_bind(source) or source in declared_volumes, f"{name}: volume {source} is not declared"
        assert set(service.get("networks", [])) <= declared_networks
        assert service.get("networks") or service.get("network_mode") == "none", f"{name}: no network chosen"


def test_compose_deployment_is_authenticated_encrypted_and_private():
    compose = _compose()
    services = compose["services"]
    networks = compose["networks"]

    link = _argv(services["superlink"])
    for flag, path in [("--ssl-ca-certfile", "/certs/ca.crt"), ("--ssl-certfile", "/certs/superlink.crt"),
                       ("--ssl-keyfile", "/certs/superlink.key")]:
        assert _flag(link, flag) == path
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert _flag(link, "--isolation") == "process"
    database = _flag(link, "--database")
    state = [(s, t) for s, t, ro in _mounts(services["superlink"]) if database.startswith(t + "/") and not ro]
    assert state and not _is_bind(state[0][0]), "the SuperLink's state must live on a named volume"
    link_port = _flag(link, "--port")
    assert any(str(p).endswith(f":{link_port}") for p in services["superlink"]["ports"])

    server = _argv(services["serverapp"])
    assert _flag(server, "--runtime-api-address") == f"superlink:{link_port}"
    assert _flag(server, "--root-certificates") == "/certs/ca.crt" and "--insecure" not in server
    assert _flag(server, "--superexec-auth-secret-file") == _flag(link, "--superexec-auth-secret-file")
    assert all(networks[n].get("internal") for n in services["serverapp"]["networks"])

    # The SuperLink is published on loopback unless the coordinator says otherwise.
    published = [_interpolate(str(p), {}) for p in services["superlink"]["ports"]]
    assert published == [f"127.0.0.1:9093:{link_port}"]
    assert _interpolate(str(services["superlink"]["ports"][0]), {"SUPERLINK_BIND_ADDRESS": "10.1.2.3"}).startswith(
        "10.1.2.3:")

    from flwr.common.config import parse_config_args

    data_sources: dict[str, str] = {}
    for h, (node_name, app_name, firewall_name) in _hospital_services().items():
        node, app, firewall = services[node_name], services[app_name], services[firewall_name]
        node_argv, app_argv = _argv(node), _argv(app)
        # The SuperNode: TLS to the SuperLink, its own key, no patient data.
        assert _flag(node_argv, "--superlink") == f"superlink:{link_port}"
        assert _flag(node_argv, "--root-certificates") == "/certs/ca.crt" and "--insecure" not in node_argv
        key = _flag(node_argv, "--auth-supernode-private-key")
        key_source = next(s for s, t, ro in _mounts(node) if t == key and ro)
        assert key_source.endswith(f"/supernode-{h}")
        assert _flag(node_argv, "--isolation") == "process"
        config = parse_config_args([_flag(node_argv, "--node-config")])
        assert set(config) == {"deidentified-path", "partition-id"}
        assert config["partition-id"] == int(h) - 1
        assert not any(t == config["deidentified-path"] for _, t, _ in _mounts(node))
        # Its ClientApp SuperExec: talks to this SuperNode only, over the hospital's internal network.
        assert _flag(app_argv, "--runtime-api-address") == f"{node_name}:{_flag(node_argv, '--port')}"
        assert _flag(app_argv, "--superexec-auth-secret-file") == _flag(node_argv, "--superexec-auth-secret-file")
        assert set(app["networks"]) == {f"hospital-{h}"} and networks[f"hospital-{h}"].get("internal") is True
        users = {n for n, s in services.items() if f"hospital-{h}" in s.get("networks", [])}
        assert users == {node_name, app_name}
        # The ClientApp mounts the firewall's published pairs, read-only, and nothing else of the hospital's.
        app_mounts = _mounts(app)
        published = [(s, ro) for s, t, ro in app_mounts if t == config["deidentified-path"]]
        assert published == [(f"hospital-{h}-deidentified", True)], f"{app_name}: {app_mounts}"
        assert {t for _, t, _ in app_mounts} == {config["deidentified-path"], _flag(app_argv, "--superexec-auth-secret-file")}
        # The firewall service: the photos read-only, no network at all, publishing what the ClientApp reads.
        watch = _watch_args(firewall)
        fw_mounts = _mounts(firewall)
        assert firewall.get("network_mode") == "none" and "networks" not in firewall and "ports" not in firewall
        data = [(s, ro) for s, t, ro in fw_mounts if t == watch.photos_dir]
        assert len(data) == 1 and data[0][1] and _is_bind(data[0][0]), f"{firewall_name}: photos must be one read-only mount"
        data_sources[h] = data[0][0]
        assert [(s, ro) for s, t, ro in fw_mounts if t == watch.publish] == [(f"hospital-{h}-deidentified", False)]
        work = [(s, ro) for s, t, ro in fw_mounts if t == watch.work_dir]
        assert work == [(f"hospital-{h}-firewall", False)]
        assert all(ro for s, t, ro in fw_mounts if t == "/models"), "SD3/FLUX weights are mounted read-only"
        assert _environment(firewall, {"HOSPITAL_1_OVERRIDES": "x", "HOSPITAL_2_OVERRIDES": "y"})["SKINFED_OVERRIDES"] \
            == {"1": "x", "2": "y"}[h]
        # A GPU for the firewall and the ClientApp, which CPU-only hosts drop.
        for service in (app, firewall):
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices and "gpu" in devices[0]["capabilities"]
    # No service but a hospital's own firewall sees its photos; no two hospitals share a folder or volume.
    assert len(set(data_sources.values())) == len(HOSPITALS)
    for h, source in data_sources.items():
        seen_by = {n for n, s in services.items() for src, _, _ in _mounts(s) if src == source}
        assert seen_by == {f"firewall-{h}"}
    for name, service in services.items():
        for source, _, _ in _mounts(service):
            if source.startswith("hospital-"):
                h = source.split("-")[1]
                allowed = {f"firewall-{h}"} if source.endswith("-firewall") else {f"firewall-{h}", f"clientapp-{h}"}
                assert name in allowed, (name, source)
    # A node's private key and secrets are mounted where they belong only.
    for name, service in services.items():
        for source, _, _ in _mounts(service):
            base = Path(source).name
            if re.fullmatch(r"supernode-\d+(\.superexec-secret)?", base):
                assert name in (f"supernode-{base.split('-')[1].split('.')[0]}",
                                f"clientapp-{base.split('-')[1].split('.')[0]}"), (name, base)
                if "." not in base:
                    assert name.startswith("supernode-"), f"{name} must not hold a node's private key"
            if base in ("ca.key", "superlink.key"):
                assert name == "superlink" and base == "superlink.key", (name, base)
    # Secrets and keys never reach a firewall service.
    for h in HOSPITALS:
        assert not any("/certs" in t for _, t, _ in _mounts(services[f"firewall-{h}"]))


def test_dockerfile_builds_a_non_root_offline_runtime():
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    base = next(rest for w, rest in instructions if w == "FROM")
    args = {k: v for w, rest in instructions if w == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}
    image = _interpolate(base, args)
    assert "cuda" in image.lower(), image
    users = [_interpolate(rest, args) for w, rest in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0", ""), "the containers must not run as root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    env = _dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    runs = " ".join(rest for w, rest in instructions if w == "RUN")
    assert re.search(r"pip install [^&]*/tmp/skinfed-src", runs) and "-e " not in runs
    assert "find_embedded_weights" in runs, "the build checks that the embedded model shipped"
    assert args["FLWR_VERSION"] == _flwr_version(), "the image pins the flwr that the compose flags are tested with"
    # From the build context (not from an earlier stage: COPY --from=...).
    copies = [rest.split() for w, rest in instructions if w == "COPY" and "--from=" not in rest]
    for parts in copies:
        for source in [p for p in parts[:-1] if not p.startswith("--")]:
            assert (ROOT / source).exists(), source
            assert not source.startswith(("deploy", "runs", ".venv", "tests")), source
    assert any("models/" in parts[:-1] for parts in copies), "the embedded model is copied and installed"
    entry = json.loads(next(rest for w, rest in instructions if w == "ENTRYPOINT"))
    assert entry == ["flower-superexec"]
    assert not DOCKERFILE.read_text().startswith("# syntax="), "BuildKit would pull a frontend from a registry"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".venv", "deploy", "runs", "*.key", ".env"):
        assert must in ignored
    # The flower programs the compose file runs are console scripts of the installed flwr.
    for program in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert (BIN / program).is_file()


def test_make_certificates_writes_what_flwr_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"
    mine = f"{os.getuid()}:{os.getgid()}"
    assert make_certificates.main([str(out), "--nodes", "2", "--san", "fl.example.org", "--san", "10.0.0.7",
                                   "--owner", mine]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"ca.crt", "ca.key", "superlink.crt", "superlink.key", "superlink.superexec-secret",
                     "supernode-1", "supernode-1.pub", "supernode-1.superexec-secret",
                     "supernode-2", "supernode-2.pub", "supernode-2.superexec-secret"}
    for name in names:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        private = name.endswith((".key", "-secret")) or re.fullmatch(r"supernode-\d", name)
        assert mode == (0o600 if private else 0o644), (name, oct(mode))

    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink", "fl.example.org"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.7"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}

    for i in (1, 2):
        private = load_ssh_private_key((out / f"supernode-{i}").read_bytes(), None)  # as flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = load_ssh_public_key((out / f"supernode-{i}.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert try_load_public_key(out / f"supernode-{i}.pub")  # as `flwr supernode register` does
        secret = (out / f"supernode-{i}.superexec-secret").read_bytes()
        assert len(secret) == 64 and b"\n" not in secret

    # Nothing is overwritten by accident; a hospital can make its own key pair alone.
    before = (out / "supernode-1").read_bytes()
    assert make_certificates.main([str(out), "--owner", mine]) == 1
    assert (out / "supernode-1").read_bytes() == before
    assert make_certificates.main([str(tmp_path / "site"), "--node-key-only", "hospital-9", "--owner", "keep"]) == 0
    assert {p.name for p in (tmp_path / "site").iterdir()} == {
        "hospital-9", "hospital-9.pub", "hospital-9.superexec-secret"}


def test_make_certificates_gives_the_files_to_the_containers_user(tmp_path):
    """The quick-start's keys must be readable by the containers' uid (1000 by default)."""
    assert make_certificates.build_parser().parse_args([str(tmp_path)]).owner == "1000:1000"
    if os.geteuid() == 0:
        out = tmp_path / "as-root"
        assert make_certificates.main([str(out), "--owner", "1234:4321"]) == 0
        owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in out.iterdir()}
        assert owners.pop("ca.key") == (0, 0)  # mounted nowhere: stays with whoever made it
        assert set(owners.values()) == {(1234, 4321)}
    else:  # another user's files cannot be made: refuse before writing anything, and say what to do
        other = os.geteuid() + 1
        assert make_certificates.main([str(tmp_path / "refused"), "--owner", f"{other}:{other}"]) == 1
        assert not (tmp_path / "refused").exists()


def _client_metric_keys() -> set[str]:
    """The keys of every MetricRecord the ClientApp sends back: the fields of the
    replies in skinfed/hospital_replies.py, which client/app.py builds its records from."""
    from skinfed.hospital_replies import SENT_KEYS

    tree = ast.parse((ROOT / "client" / "app.py").read_text())
    literal = [node for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MetricRecord"
               and node.args and isinstance(node.args[0], ast.Dict)]
    assert not literal, "client/app.py builds a MetricRecord by hand: use the replies of skinfed.hospital_replies"
    return set(SENT_KEYS)


def test_deployment_docs_match_the_files():
    text = DOCS.read_text()
    compose = _compose()
    for name in compose["services"]:
        assert f"`{name}`" in text, f"docs/deployment.md does not mention the service {name}"
    for variable in sorted(set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))):
        assert variable in text, f"docs/deployment.md does not explain ${variable}"
    for name in ("ca.crt", "ca.key", "superlink.crt", "superlink.key", "superlink.superexec-secret",
                 "supernode-1.pub", "supernode-1.superexec-secret"):
        assert name in text
    # "What leaves a hospital" lists exactly the ClientApp's metrics.
    section = text.split("## What leaves a hospital", 1)[1].split("\n## ", 1)[0]
    paragraphs = section.split("\n\n")
    listed = set(re.findall(r"`([\w-]+)`", paragraphs[1]))
    assert listed == _client_metric_keys() == {"train_loss", "num-examples", "firewall_accepted",
                                               "firewall_refused", "dice", "iou", "loss",
                                               "ready", "done", "total", "accepted", "refused"}
    # and, with patient-level DP, exactly the accounting a training reply adds
    from skinfed.patient_privacy import accounting_metrics

    with_dp = set(re.findall(r"`([\w-]+)`", paragraphs[2])) - {"train_loss"}
    assert with_dp == set(accounting_metrics([(1.0, 0.1, 10)], 1e-5, 1.0))
    # Every flag the docs show exists: in this flwr's programs, in make_certificates, or
    # these few of the flwr CLI (`flwr run`, `flwr supernode`) and `docker compose up`.
    parsers = [*(build() for build in _flwr_parsers().values()), make_certificates.build_parser()]
    from privacy_firewall.cli import build_parser as firewall_parser

    watch = firewall_parser()._subparsers._group_actions[0].choices["watch"]
    known = {o for parser in [*parsers, watch] for a in parser._actions for o in a.option_strings}
    known |= {"--stream", "--run-config", "--format", "--no-deps", "--build-arg", "--project-name", "--rm",
              "--network", "--volume", "--entrypoint"}
    unknown = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)) - known
    assert not unknown, f"docs/deployment.md shows flags that do not exist: {unknown}"
    assert f":{_flag(_argv(compose['services']['superlink']), '--port')}" in text
    # Commands for Debian's docker-compose 1.29 and Compose v2 alike: no v2-only subcommands.
    assert "compose cp" not in text and "docker-compose cp" not in text
    assert "docker-compose config" in text and "DOCKER-USER" in text


# ----------------------------------------------------------------------------- (b) end to end on 127.0.0.1
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hospital_folders(root: Path, per_hospital: int = 4) -> list[Path]:
    from tests.conftest import make_hospital_folders

    return make_hospital_folders(root, per_hospital, subfolder="hospital-data")


class LocalDeployment:
    """docker-compose.yml's services as processes: container paths become
    folders under ``root``, ``service:port`` becomes ``127.0.0.1:<free port>``."""

    def __init__(self, root: Path, host_env: dict[str, str], base_env: dict[str, str]):
        self.root = root
        self.host_env = host_env  # what `docker compose` would interpolate with
        self.base_env = base_env
        self.compose = _compose()
        self.ports: dict[tuple[str, str], int] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)
        for name, service in self.compose["services"].items():
            port = _flag(_argv(service), "--port")
            if port:
                self.ports[(name, port)] = _free_port()

    def add_service(self, name: str, service: dict) -> None:
        self.compose["services"][name] = service
        port = _flag(_argv(service), "--port")
        if port:
            self.ports[(name, port)] = _free_port()

    def port(self, service: str) -> int:
        return next(p for (name, _), p in self.ports.items() if name == service)

    def _paths(self, name: str) -> list[tuple[str, str]]:
        """(container path, host path) for a service, longest container path first."""
        pairs = []
        for source, target, _ in _mounts(self.compose["services"][name], self.host_env):
            host = Path(source).expanduser() if _is_bind(source) else self.root / "volumes" / source
            if not _is_bind(source):
                host.mkdir(parents=True, exist_ok=True)
            pairs.append((target, str(host)))
        # The rest of the container's own file system.
        for target in ("/work", "/var/lib/flwr", "/data", "/models", "/certs"):
            if not any(t == target or target.startswith(t + "/") for t, _ in pairs):
                pairs.append((target, str(self.root / "containers" / name / target.strip("/"))))
        return sorted(pairs, key=lambda p: -len(p[0]))

    def _map(self, name: str, value: str) -> str:
        paths = dict(self._paths(name))  # one pass, longest container path first
        pattern = "|".join(re.escape(t) for t in paths)
        value = re.sub(rf'(?:^|(?<=[="\s]))(?:{pattern})(?=[/"\s]|$)', lambda m: paths[m[0]], value)
        for (service, port), local in self.ports.items():
            value = value.replace(f"{service}:{port}", f"127.0.0.1:{local}")
        return value

    def _app_of(self, node: str) -> str:
        """The service that runs a SuperNode's ClientApps (whose file system its node config describes)."""
        address = f"{node}:{_flag(_argv(self.compose['services'][node]), '--port')}"
        return next((name for name, s in self.compose["services"].items()
                     if _flag(_argv(s), "--runtime-api-address") == address), node)

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        service = self.compose["services"][name]
        argv = _argv(service)
        out = [str(BIN / argv[0])]
        for i, arg in enumerate(argv[1:], start=1):
            if arg.startswith("--port="):
                arg = f"--port={self.ports[(name, arg.split('=', 1)[1])]}"
            elif arg == "--host=0.0.0.0":
                arg = "--host=127.0.0.1"
            elif argv[i - 1] == "--node-config" or arg.startswith("--node-config="):
                out.append(self._map(self._app_of(name), arg))
                continue
            out.append(self._map(name, arg))
        env = dict(self.base_env)
        for key, value in {**_dockerfile_env(), **_environment(service, self.host_env)}.items():
            env[key] = self._map(name, value)
        env["FLWR_HOME"] = str(self.root / "containers" / name / "flwr-home")  # the image's ~/.flwr
        return out, env

    def start(self, name: str) -> subprocess.Popen:
        argv, env = self.command(name)
        self.logs[name] = self.root / "logs" / f"{name}.log"
        log = open(self.logs[name], "wb")
        self.procs[name] = subprocess.Popen(argv, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self.procs[name]

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"----- {name}\n" + "\n".join(self.log(name).splitlines()[-lines:]) for name in self.logs)

    def stop(self) -> None:
        """SIGTERM every process group (the SuperExecs' app processes too), then SIGKILL."""
        for proc in reversed(list(self.procs.values())):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def leftovers(self) -> list[str]:
        """Live processes of ours: in one of our process groups, or naming our folder."""
        groups = {proc.pid for proc in self.procs.values()}
        # -ww: full command lines (ps cuts them to 80 columns when not writing to a terminal).
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
        alive = []
        for line in out.splitlines():
            pid, pgid, state, args = (line.split(None, 3) + [""])[:4]
            if state.startswith("Z") or int(pid) == os.getpid():
                continue
            if int(pgid) in groups or str(self.root) in args:
                alive.append(line.strip())
        return alive


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")


def _flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _aggregated(stream: str, phase: str) -> set[str]:
    """The metric names in flwr's 'aggregate_<phase>' summary line of the run's log."""
    lines = stream.splitlines()
    for i, line in enumerate(lines):
        if f"aggregate_{phase}: Received" in line:
            record = lines[i + 1].split("Aggregated MetricRecord:", 1)[1].strip()
            return set(ast.literal_eval(record))
    raise AssertionError(f"no aggregate_{phase} summary in the run's log")


def _wait_for_firewall(published: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    from privacy_firewall.watch import read_status

    deadline = time.time() + timeout
    while time.time() < deadline:
        if read_status(published).ready:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the firewall service exited with code {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"the firewall service is not ready after {timeout:.0f} s: {read_status(published)}")


# In the default run (CI keeps the loopback test): ~3 min on 2 idle cores.
def test_compose_deployment_runs_one_round_on_loopback(tmp_path, tiny_embedded_dir):
    """Each hospital's firewall service de-identifies its photos first; then the
    SuperLink (TLS, node authentication, process isolation) + its ServerApp
    SuperExec, two enrolled hospitals (SuperNode + ClientApp SuperExec, each
    reading only its own firewall's published pairs), one round through
    `flwr run --stream`, and a third SuperNode whose key was never registered,
    which is refused."""
    started = time.time()
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    certs = tmp_path / "certs"
    make_certificates.write_all(certs, nodes=2, sans=[], days=2, force=False)
    make_certificates.write_node_keys(certs, "supernode-3", force=False)  # never registered
    hospitals = _hospital_folders(tmp_path)
    (tmp_path / "models").mkdir()

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SKINFED_", "FLWR_"))}
    base_env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                     "SKINFED_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # The hospitals' own settings: the firewall services run on the tiny model.
    hospital_overrides = " ".join([f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES])
    host_env = {"SKINFED_CERTS": str(certs), "HOSPITAL_1_DATA": str(hospitals[0]),
                "HOSPITAL_2_DATA": str(hospitals[1]), "SKINFED_MODELS": str(tmp_path / "models"),
                "HOSPITAL_1_OVERRIDES": hospital_overrides, "HOSPITAL_2_OVERRIDES": hospital_overrides}
    deployment = LocalDeployment(tmp_path / "deployment", host_env, base_env)
    # A third SuperNode exactly like the first, with its own, unregistered key.
    rogue = copy.deepcopy(deployment.compose["services"]["supernode-1"])
    rogue["command"] = [a.replace("supernode-1", "supernode-3") for a in rogue["command"]]
    rogue["volumes"] = [v.replace("supernode-1", "supernode-3") for v in rogue["volumes"]]
    deployment.add_service("supernode-3", rogue)

    cli_home = tmp_path / "flwr-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "skinfed"\n\n[superlink.skinfed]\n'
        f'address = "127.0.0.1:{deployment.port("superlink")}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    cli_env = {**base_env, "FLWR_HOME": str(cli_home), "FLWR_TELEMETRY_ENABLED": "0"}
    overrides = [f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES, "federation.num_hospitals=2",
                 "federation.num_rounds=1", "federation.connect_timeout=240"]
    volumes = tmp_path / "deployment" / "volumes"
    try:
        for h in HOSPITALS:  # the firewalls first: de-identification is done before and outside Flower
            firewall = deployment.start(f"firewall-{h}")
            _wait_for_firewall(volumes / f"hospital-{h}-deidentified", firewall)
        link = deployment.start("superlink")
        _wait_for_port(deployment.port("superlink"), link)
        for h in HOSPITALS:  # enrol the two hospitals
            reg = _flwr(["supernode", "register", str(certs / f"supernode-{h}.pub"), "skinfed", "--format", "json"],
                        cli_env, tmp_path, timeout=120)
            assert reg.returncode == 0 and json.loads(reg.stdout)["success"], reg.stdout + reg.stderr
        for name in ("serverapp", "supernode-1", "clientapp-1", "supernode-2", "clientapp-2", "supernode-3"):
            deployment.start(name)

        run = _flwr(["run", str(ROOT), "skinfed", "--stream", "--run-config",
                     "overrides=" + json.dumps(" ".join(overrides))], cli_env, tmp_path, timeout=480)
        stream = run.stdout + run.stderr
        assert run.returncode == 0 and "done: 1 rounds" in stream, stream[-4000:] + deployment.tails()

        # The server's run directory, on the serverapp's work volume.
        run_dir = Path(re.search(r"results in (\S+)", stream)[1])
        assert run_dir.is_relative_to(tmp_path / "deployment" / "volumes" / "server-work" / "runs")
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1]
        assert rounds[1]["clients_trained"] == 2 and rounds[1]["clients_failed"] == 0
        assert len(rounds[1]["hospitals_trained"]) == 2 and rounds[1]["hospitals_missed"] == []
        assert rounds[1]["firewall_accepted"] == 8 and rounds[1]["firewall_refused"] == 0
        assert rounds[1]["global_dice"] is not None and rounds[1]["client_dice"] is not None
        # Each hospital's firewall published its pairs; the full output (manifest) stayed in its own volume.
        from privacy_firewall.watch import read_status

        for h in HOSPITALS:
            status = read_status(volumes / f"hospital-{h}-deidentified")
            assert status.ready and status.ok == 4
            assert not list((volumes / f"hospital-{h}-deidentified").rglob("manifest.local.csv"))
            assert (volumes / f"hospital-{h}-firewall" / "output" / "manifest.local.csv").is_file()
        # Only the documented metrics came back, and nothing local reached the researcher's screen.
        # (counts are summed over the hospitals, the number of examples with them)
        assert _aggregated(stream, "train") == {"train_loss", "firewall_accepted", "firewall_refused", "num-examples"}
        assert _aggregated(stream, "evaluate") == {"dice", "iou", "loss", "num-examples"}
        for folder in hospitals:
            assert str(folder) not in stream
            assert not any(p.stem in stream for p in (folder / "images").iterdir())

        # The unregistered SuperNode was refused and is gone; the two hospitals are online.
        rogue_proc = deployment.procs["supernode-3"]
        try:
            rogue_proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the SuperNode with an unregistered key is still running\n" + deployment.log("supernode-3"))
        assert rogue_proc.returncode != 0
        assert "Failed to activate SuperNode" in deployment.log("supernode-3")
        assert "No SuperNode found with the given public key" in deployment.log("superlink")
        nodes = _flwr(["supernode", "list", "skinfed", "--format", "json"], cli_env, tmp_path, timeout=120)
        listed = json.loads(nodes.stdout)["nodes"]
        assert len(listed) == 2 and all(n["status"] == "online" for n in listed), nodes.stdout
    finally:
        deployment.stop()
        leftovers = deployment.leftovers()
        print(f"loopback deployment test: {time.time() - started:.0f} s")
        assert not leftovers, f"processes left running: {leftovers}"
        assert hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() == pyproject
