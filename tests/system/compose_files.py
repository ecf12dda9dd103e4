"""Reading the deployment files as the services see them: docker-compose.yml
(its interpolation, commands, mounts and environment), the Dockerfile and the
flwr command lines. Shared by tests/system/test_deployment.py and
tests/system/local_deployment.py."""


from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
HOSPITALS = ("1", "2")


# ----------------------------------------------------------------------------- reading the compose file
def read_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` interpolation."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), value)


def service_argv(service: dict) -> list[str]:
    entry = service.get("entrypoint") or []
    command = service.get("command") or []
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [str(x) for x in entry + command]


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def service_mounts(service: dict, env: dict[str, str] | None = None) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's volumes; a named volume's source is its name."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, dict):
            out.append((interpolate(str(vol["source"]), env or {}), vol["target"], bool(vol.get("read_only"))))
            continue
        parts = interpolate(vol, env or {}).split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def is_bind(source: str) -> bool:
    return source.startswith(("/", ".", "~"))


def service_environment(service: dict, env: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def dockerfile_env() -> dict[str, str]:
    """The image's ENV, from the Dockerfile."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for item in shlex.split(line.strip()[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def service_roles(compose: dict) -> dict[str, list[str]]:
    """Service names by program: flower-superlink, flower-supernode, flower-superexec."""
    roles: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        roles.setdefault(Path(service_argv(service)[0]).name, []).append(name)
    return roles


def flwr_parsers():
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    return {"flower-superlink": _parse_args_run_superlink, "flower-supernode": _parse_args_run_supernode,
            "flower-superexec": superexec_parser}


def program_parsers():
    """Every program the compose file runs: flwr's three and the firewall's CLI."""
    from privacy_firewall.cli import build_parser as firewall_parser

    return {**flwr_parsers(), "privacy-firewall": firewall_parser}


def watch_args(service: dict):
    """The parsed `privacy-firewall watch` command of a firewall service."""
    from privacy_firewall.cli import build_parser

    argv = service_argv(service)
    assert Path(argv[0]).name == "privacy-firewall" and argv[1] == "watch", argv
    return build_parser().parse_args(argv[1:])


def flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def hospital_services() -> dict[str, tuple[str, str, str]]:
    """hospital number -> (its SuperNode, its ClientApp SuperExec, its firewall service)."""
    return {h: (f"supernode-{h}", f"clientapp-{h}", f"firewall-{h}") for h in HOSPITALS}


# ----------------------------------------------------------------------------- (a) the files
