"""docker-compose.yml under a real Docker engine: slow, needs Docker.

    python -m pytest -m slow tests/system/test_docker_stack.py      # builds the image first (scripts/deployment_check.sh)
    sudo scripts/deployment_check.sh                          # the same, as a script a person can run
    python -m tests.system.docker_stack [--no-build] [--keep]   # the check alone; --down cleans up after a kill

What it does, as the docs' quick-start does it: certificates from
scripts/make_certificates.py (owned by the containers' uid), two hospital photo
folders, the compose file with its GPU block replaced by ``x-gpu: &gpu {}`` (the
CPU-only recipe of docs/deployment.md); the firewall services first (checked to
have no network at all, and to publish their status); then the coordinator, the
enrolment of both hospitals with ``flwr supernode register``, every service, and
a third SuperNode whose key was never registered. With the host firewall rules of
the docs in place (root only) it checks that a ClientApp cannot reach the Docker
host through its bridge gateway. Then two rounds with ``flwr run --stream``;
hospital 2's three containers are killed as round 2 starts. The run must finish,
with hospital 2 (by node id) reported as failed in round 2. Everything is torn down
(containers, networks, volumes, firewall rules) unless ``--keep``.

On a host whose CPUs are starved by other work, flwr 1.42's SuperLink can fail
with "database is locked" (its SQLite waits at most 5 s for a lock) and the
ServerApp's SuperExec stops on that error; the check then says so. With
``SKINFED_CHECK_SUPERLINK_STATE=memory`` the SuperLink keeps its state in memory
for the check (``--database=:flwr-in-memory:``, through the override file).

Traffic stays on this host: the SuperLink is published on 127.0.0.1 only, and the
containers talk over the bridges this compose project creates. Compose project
``skinfedcheck`` and bridge names ``skfchk-*`` keep it apart from a real
deployment on the same host. The last stdout line of ``python -m`` is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROJECT = "skinfedcheck"
IMAGE = "skinfed:0.1.0"
#: The compose file's fixed bridge names, renamed for this check's project.
BRIDGES = {"skinfed-coord": "skfchk-coord", "skinfed-h1": "skfchk-h1", "skinfed-h2": "skfchk-h2"}
TINY_MODEL = "/models/tiny"  # inside the containers: SKINFED_MODELS is mounted at /models



def say(text: str) -> None:
    print(f"[docker-stack {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, env: dict | None = None, timeout: float = 300, check: bool = True,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def compose_command() -> list[str]:
    """$COMPOSE, else Debian's docker-compose (1.29), else the Compose v2 plugin."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    raise RuntimeError("neither docker-compose nor `docker compose` is installed")


def cpu_only_compose(text: str) -> str:
    """docker-compose.yml as docs/deployment.md says for CPU-only hosts (the x-gpu
    block replaced by one line), with this check's bridge names."""
    text, n = re.subn(r"(?ms)^x-gpu: &gpu\n(?:[ #].*?\n|\n(?=[ #]))*(?=\S)", "x-gpu: &gpu {}\n\n", text)
    assert n == 1, "docker-compose.yml has no x-gpu block to replace"
    for name, ours in BRIDGES.items():
        assert f"com.docker.network.bridge.name: {name}" in text, name
        text = text.replace(f"com.docker.network.bridge.name: {name}", f"com.docker.network.bridge.name: {ours}")
    return text


ROGUE = """# A third SuperNode exactly like the others, with a key that was never registered.
services:
  supernode-3:
    image: skinfed:0.1.0
    init: true
    restart: "no"
    entrypoint: ["flower-supernode"]
    command:
      - --superlink=superlink:9093
      - --root-certificates=/certs/ca.crt
      - --auth-supernode-private-key=/certs/supernode-3
      - --isolation=process
      - --superexec-auth-secret-file=/certs/supernode-3.superexec-secret
      - --host=0.0.0.0
      - --port=9094
    volumes:
      - ${SKINFED_CERTS}/ca.crt:/certs/ca.crt:ro
      - ${SKINFED_CERTS}/supernode-3:/certs/supernode-3:ro
      - ${SKINFED_CERTS}/supernode-3.superexec-secret:/certs/supernode-3.superexec-secret:ro
    networks: [federation]
"""

#: SKINFED_CHECK_SUPERLINK_STATE=memory: the SuperLink's state in memory instead of SQLite.
IN_MEMORY_SUPERLINK = """
  superlink:
    command:
      - --ssl-ca-certfile=/certs/ca.crt
      - --ssl-certfile=/certs/superlink.crt
      - --ssl-keyfile=/certs/superlink.key
      - --enable-supernode-auth
      - --isolation=process
      - --superexec-auth-secret-file=/certs/superlink.superexec-secret
      - "--database=:flwr-in-memory:"
      - --host=0.0.0.0
      - --port=9093
      - --disable-runtime-dependency-installation
"""


def override_file() -> str:
    """The check's override file: the rogue SuperNode (and an in-memory SuperLink if asked)."""
    memory = os.environ.get("SKINFED_CHECK_SUPERLINK_STATE", "") == "memory"
    return ROGUE + (IN_MEMORY_SUPERLINK if memory else "")


def _succeeded(proc: subprocess.CompletedProcess) -> bool:
    """A `flwr ... --format json` call that worked (flwr may exit 0 with success false)."""
    try:
        return proc.returncode == 0 and bool(json.loads(proc.stdout).get("success"))
    except ValueError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_user(image: str = IMAGE) -> tuple[int, int]:
    user = _run(["docker", "image", "inspect", "-f", "{{.Config.User}}", image]).stdout.strip()
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def make_tiny_model(folder: Path) -> None:
    """A random-weight embedded flow model at 16x16 (as tests/conftest.py): the
    real code path at a tiny cost on a CPU host."""
    import torch

    from models.attribute_classifier import AttributeClassifier, save_classifier
    from models.flow_unet import FlowUNet, FlowUNetConfig, save_flow_unet

    torch.manual_seed(0)
    model = FlowUNet(FlowUNetConfig(image_size=16, channels=(8, 16), blocks_per_level=1, attention_levels=(1,),
                                    embed_dim=16))
    torch.nn.init.normal_(model.out.weight, std=0.1)
    save_flow_unet(model, folder)
    save_classifier(AttributeClassifier(width=8), folder, {})


def make_hospitals(root: Path, per_hospital: int = 4) -> list[Path]:
    from tests.conftest import make_hospital_folders

    return make_hospital_folders(root, per_hospital, subfolder="data")


# ----------------------------------------------------------------------------- the stack
@dataclass
class DockerStack:
    root: Path
    compose: list[str] = field(default_factory=compose_command)
    env: dict[str, str] = field(default_factory=dict)
    rules: list[list[str]] = field(default_factory=list)  # iptables rules we inserted (to delete)

    def files(self) -> list[str]:
        return ["-f", str(self.root / "docker-compose.yml"), "-f", str(self.root / "rogue.yml")]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return _run([*self.compose, "-p", PROJECT, *self.files(), *args], env=self.env, timeout=timeout,
                    check=check, cwd=self.root)

    def container(self, service: str) -> str:
        cid = self.run("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid.splitlines()[0]

    def exec(self, service: str, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("exec", "-T", service, *argv, check=check, timeout=timeout)

    def python(self, service: str, code: str) -> str:
        return self.exec(service, "python", "-c", code).stdout.strip()

    def status(self, service: str) -> dict:
        out = self.exec(service, "cat", "/deidentified/status.json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}

    def network(self, name: str) -> dict:
        ids = _run(["docker", "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                    "--filter", f"label=com.docker.compose.network={name}"]).stdout.split()
        assert len(ids) == 1, f"network {name}: {ids}"
        return json.loads(_run(["docker", "network", "inspect", ids[0]]).stdout)[0]

    def close_gateways(self) -> None:
        """docs/deployment.md's host firewall rules: nothing from the internal bridges to the host."""
        for bridge in BRIDGES.values():
            rule = ["INPUT", "-i", bridge, "-j", "DROP"]
            _run(["iptables", "-I", *rule])
            self.rules.append(rule)

    def down(self) -> None:
        for rule in self.rules if shutil.which("iptables") else []:
            _run(["iptables", "-D", *rule], check=False)
        self.rules.clear()
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=300, check=False)


def _gateway_reachable(stack: DockerStack, service: str, gateway: str) -> bool:
    """Can ``service`` open a TCP connection to a listener on the Docker host's
    side of its bridge? (The listener is bound to the gateway address only.)"""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((gateway, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    accepted: list[str] = []

    def accept() -> None:
        listener.settimeout(15)
        try:
            conn, addr = listener.accept()
            accepted.append(addr[0])
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    out = stack.python(service, (
        "import socket\ns = socket.socket(); s.settimeout(5)\n"
        f"try:\n    s.connect(({gateway!r}, {port})); print('connected')\n"
        "except OSError as e:\n    print(type(e).__name__)"))
    thread.join()
    listener.close()
    return out == "connected" and bool(accepted)


def run_check(root: Path, *, keep: bool = False) -> dict:
    """The whole check in ``root`` (scratch); returns what was measured."""
    from scripts import make_certificates
    from tests.conftest import TINY_OVERRIDES

    started = time.time()
    result: dict = {"compose": None, "checks": {}}
    owner = image_user()
    certs, models = root / "certs", root / "models"
    make_certificates.write_all(certs, nodes=2, sans=[], days=2, force=False, owner=owner)
    make_certificates.write_node_keys(certs, "supernode-3", force=False, owner=owner)  # never registered
    hospitals = make_hospitals(root)
    make_tiny_model(models / "tiny")
    for path in [root, *root.rglob("*")]:  # readable by the containers' uid (tmp folders are 0700)
        if not path.is_relative_to(certs) or path == certs:
            path.chmod(0o755 if path.is_dir() else 0o644)
    (root / "docker-compose.yml").write_text(cpu_only_compose((ROOT / "docker-compose.yml").read_text()))
    (root / "rogue.yml").write_text(override_file())
    result["superlink_state"] = "memory" if "flwr-in-memory" in override_file() else "sqlite"

    port = _free_port()
    hospital_overrides = " ".join([f"firewall.backend.model_path={TINY_MODEL}", *TINY_OVERRIDES])
    stack = DockerStack(root)
    stack.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SKINFED_", "HOSPITAL_", "COMPOSE_"))},
                 "SKINFED_CERTS": str(certs), "HOSPITAL_1_DATA": str(hospitals[0]),
                 "HOSPITAL_2_DATA": str(hospitals[1]), "SKINFED_MODELS": str(models),
                 "SUPERLINK_BIND_ADDRESS": "127.0.0.1", "SUPERLINK_PORT": str(port),
                 "HOSPITAL_1_OVERRIDES": hospital_overrides, "HOSPITAL_2_OVERRIDES": hospital_overrides}
    result["compose"] = " ".join(stack.compose) + " " + _run([*stack.compose, "version"], check=False).stdout.split("\n")[0]
    cli_home = root / "flwr-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "skinfed"\n\n[superlink.skinfed]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SKINFED_", "FLWR_"))},
               "FLWR_HOME": str(cli_home), "FLWR_TELEMETRY_ENABLED": "0"}

    def flwr(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return _run([str(BIN / "flwr"), *args], env=cli_env, timeout=timeout, check=check, cwd=root)

    def _logs(service: str) -> str:
        out = stack.run("logs", "--tail", "30", service, check=False)
        return out.stdout + out.stderr

    try:
        say(f"compose: {result['compose']}; validating the file")
        stack.run("config", "-q")

        # 1. The firewalls first: de-identification before and outside Flower, with no network.
        say("starting firewall-1 and firewall-2")
        stack.run("up", "-d", "--no-build", "firewall-1", "firewall-2")
        deadline = time.time() + 600
        while not all(stack.status(f"firewall-{h}").get("state") == "ready" for h in (1, 2)):
            assert time.time() < deadline, f"firewalls not ready: {[stack.status(f'firewall-{h}') for h in (1, 2)]}"
            time.sleep(3)
        statuses = {h: stack.status(f"firewall-{h}") for h in (1, 2)}
        say(f"firewalls ready: {statuses}")
        assert all(s["ok"] == 4 and s["total"] == 4 for s in statuses.values())
        result["checks"]["firewall_status"] = {h: {k: s[k] for k in ("state", "done", "total", "ok", "failed")}
                                               for h, s in statuses.items()}
        for h in (1, 2):
            mode = _run(["docker", "inspect", "-f", "{{.HostConfig.NetworkMode}}",
                         stack.container(f"firewall-{h}")]).stdout.strip()
            interfaces = stack.python(f"firewall-{h}", "import os; print(sorted(os.listdir('/sys/class/net')))")
            assert mode == "none" and interfaces == "['lo']", (mode, interfaces)
        result["checks"]["firewall_network"] = "network_mode none; interfaces ['lo'] only"

        # 2. The coordinator, and the enrolment of the two hospitals.
        say("starting superlink and serverapp")
        stack.run("up", "-d", "--no-build", "superlink", "serverapp")
        deadline = time.time() + 180
        while not _succeeded(flwr("supernode", "list", "skinfed", "--format", "json", check=False)):
            assert time.time() < deadline, "the SuperLink does not answer the flwr CLI\n" + _logs("superlink")
            time.sleep(2)
        node_ids = {}
        for h in (1, 2):
            reg = flwr("supernode", "register", str(certs / f"supernode-{h}.pub"), "skinfed", "--format", "json")
            answer = json.loads(reg.stdout)
            assert answer["success"], reg.stdout
            node_ids[h] = int(answer["node-id"])
        say(f"enrolled: hospital node ids {node_ids}")
        result["checks"]["node_ids"] = node_ids

        # 3. Everything else, and the rogue SuperNode.
        stack.run("up", "-d", "--no-build")
        rogue = stack.container("supernode-3")
        deadline = time.time() + 120
        while _run(["docker", "inspect", "-f", "{{.State.Running}}", rogue]).stdout.strip() == "true":
            assert time.time() < deadline, "the SuperNode with an unregistered key is still running"
            time.sleep(2)
        code = int(_run(["docker", "inspect", "-f", "{{.State.ExitCode}}", rogue]).stdout.strip())
        rogue_log = _run(["docker", "logs", rogue], check=False)
        assert code != 0 and "Failed to activate SuperNode" in rogue_log.stdout + rogue_log.stderr, code
        result["checks"]["unregistered_key"] = f"refused: supernode-3 exited with code {code} (Failed to activate SuperNode)"
        say(result["checks"]["unregistered_key"])

        # 4. The ClientApp's network: no SuperLink, and (with the docs' rules) no Docker host.
        reach = stack.python("clientapp-1", (
            "import socket\ntry:\n    socket.create_connection(('superlink', 9093), timeout=5); print('reached')\n"
            "except OSError as e:\n    print(type(e).__name__)"))
        assert reach != "reached", "clientapp-1 reached the SuperLink"
        gateway = stack.network("hospital-1")["IPAM"]["Config"][0]["Gateway"]
        checks = {"superlink_from_clientapp": f"unreachable ({reach})"}
        if os.geteuid() == 0 and shutil.which("iptables"):
            before = _gateway_reachable(stack, "clientapp-1", gateway)
            stack.close_gateways()
            after = _gateway_reachable(stack, "clientapp-1", gateway)
            assert not after, "the INPUT rules did not close the bridge gateway"
            checks["docker_host_via_gateway"] = f"reachable before the docs' INPUT rules: {before}; after: {after}"
        else:
            checks["docker_host_via_gateway"] = "not checked (needs root and iptables)"
        result["checks"].update(checks)
        say(f"network checks: {checks}")

        # 5. Two rounds; hospital 2's containers are killed as round 2 starts.
        # mobilenet_v2: a 9 MB U-Net instead of resnet18's 45 MB, so that a loaded host's SQLite
        # (the SuperLink keeps every message in it) is not the bottleneck.
        overrides = [f"firewall.backend.model_path={TINY_MODEL}", *TINY_OVERRIDES, "model.encoder=mobilenet_v2",
                     "federation.num_hospitals=2", "federation.num_rounds=2", "federation.min_available_hospitals=1",
                     "federation.round_timeout=300", "federation.connect_timeout=180"]
        stream_path = root / "flwr-run.log"
        say("flwr run: 2 rounds")
        with open(stream_path, "w") as stream_file:
            run = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "skinfed", "--stream", "--run-config",
                                    "overrides=" + json.dumps(" ".join(overrides))], env=cli_env, cwd=root,
                                   stdout=stream_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            killed_at = None
            deadline = time.time() + 1500
            while run.poll() is None:
                assert time.time() < deadline, "flwr run did not finish\n" + stream_path.read_text()[-4000:]
                if killed_at is None and "[ROUND 2/2]" in stream_path.read_text(errors="replace"):
                    stack.run("kill", "supernode-2", "clientapp-2", "firewall-2")
                    killed_at = time.time()
                    say("round 2 started: killed supernode-2, clientapp-2 and firewall-2")
                time.sleep(1)
        stream = stream_path.read_text(errors="replace")
        assert killed_at is not None, "round 2 never started\n" + stream[-4000:]
        assert run.returncode == 0 and "done: 2 rounds" in stream, stream[-4000:]
        run_dir = re.search(r"results in (\S+)", stream)[1]
        rounds = json.loads(stack.exec("serverapp", "cat", f"{run_dir}/metrics.json").stdout)["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        first, second = rounds[1], rounds[2]
        assert first["clients_trained"] == 2 and sorted(first["hospitals_trained"]) == sorted(node_ids.values())
        assert second["hospitals_trained"] == [node_ids[1]], second
        assert node_ids[2] in second["hospitals_missed"] + second["hospitals_failed"], second
        assert second["clients_failed"] >= 1
        assert all(r["seconds"] <= r["seconds_total"] for r in rounds)
        for hospital in hospitals:  # nothing local reached the researcher's screen
            assert str(hospital) not in stream
            assert not any(p.stem in stream for p in (hospital / "images").iterdir())
        keys = ("round", "clients_trained", "clients_failed", "clients_missed", "hospitals_trained",
                "hospitals_failed", "hospitals_missed", "seconds", "seconds_total")
        result["checks"]["rounds"] = [{k: r.get(k) for k in keys} for r in rounds]
        result["checks"]["run"] = f"flwr run exited 0: done: 2 rounds; hospital 2 (node {node_ids[2]}) failed in round 2"
        say(result["checks"]["run"])
        listed = json.loads(flwr("supernode", "list", "skinfed", "--format", "json").stdout)["nodes"]
        result["checks"]["supernodes_after"] = {n["node-id"]: n["status"] for n in listed}
        result["ok"] = True
    except BaseException:
        # Every service's log, kept beside the scratch folder's other files for a look afterwards.
        logs = stack.run("logs", "--no-color", "--tail", "200", timeout=120, check=False)
        (root / "compose-logs.txt").write_text(logs.stdout + logs.stderr)
        say(f"failed: the services' logs are in {root / 'compose-logs.txt'}")
        if "database is locked" in logs.stdout:
            say("the SuperLink's SQLite timed out on a lock (a CPU-starved host): rerun, or set "
                "SKINFED_CHECK_SUPERLINK_STATE=memory")
        raise
    finally:
        if keep:
            say(f"--keep: the stack and {root} are left running (`python -m tests.system.docker_stack --down` removes it)")
        else:
            say("tearing down")
            stack.down()
            leftovers = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"]).stdout
            assert not leftovers.strip(), f"containers left: {leftovers}"
        result["seconds"] = round(time.time() - started)
    return result


def build_image() -> None:
    _run([str(ROOT / "scripts" / "deployment_check.sh"), "image"], timeout=3600,
         env={**os.environ, "PYTHON": sys.executable})


# ----------------------------------------------------------------------------- as a script
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system.docker_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-build", action="store_true", help="use the existing skinfed:0.1.0")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--down", action="store_true", help="remove what an interrupted check left behind")
    args = parser.parse_args(argv)
    if args.down:
        scratch = Path(tempfile.mkdtemp(prefix="skinfed-check-down-"))
        (scratch / "docker-compose.yml").write_text(cpu_only_compose((ROOT / "docker-compose.yml").read_text()))
        (scratch / "rogue.yml").write_text(ROGUE)
        stack = DockerStack(scratch, env={**os.environ, "SKINFED_CERTS": str(scratch)})
        stack.rules = [["INPUT", "-i", bridge, "-j", "DROP"] for bridge in BRIDGES.values()]
        stack.down()
        shutil.rmtree(scratch, ignore_errors=True)
        print(json.dumps({"down": True}))
        return 0
    if not args.no_build:
        build_image()
    root = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="skinfed-check-", dir="/var/tmp"))
    try:
        result = run_check(root, keep=args.keep or os.environ.get("KEEP") == "1")
    except AssertionError as exc:
        say(f"FAILED: {exc}")
        print(json.dumps({"ok": False, "error": str(exc)[:2000]}))
        return 1
    finally:
        if not (args.keep or os.environ.get("KEEP") == "1"):
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
