"""docker-compose.yml's services started as plain processes on 127.0.0.1: the
harness of the loopback deployment test (tests/system/test_deployment.py)."""


from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.system.compose_files import (
    BIN,
    dockerfile_env,
    flag_value,
    is_bind,
    read_compose,
    service_argv,
    service_environment,
    service_mounts,
)


# ----------------------------------------------------------------------------- (b) end to end on 127.0.0.1
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hospital_folders(root: Path, per_hospital: int = 4) -> list[Path]:
    from tests.conftest import make_hospital_folders

    return make_hospital_folders(root, per_hospital, subfolder="hospital-data")


class LocalDeployment:
    """docker-compose.yml's services as processes: container paths become
    folders under ``root``, ``service:port`` becomes ``127.0.0.1:<free port>``."""

    def __init__(self, root: Path, host_env: dict[str, str], base_env: dict[str, str]):
        self.root = root
        self.host_env = host_env  # what `docker compose` would interpolate with
        self.base_env = base_env
        self.compose = read_compose()
        self.ports: dict[tuple[str, str], int] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)
        for name, service in self.compose["services"].items():
            port = flag_value(service_argv(service), "--port")
            if port:
                self.ports[(name, port)] = free_port()

    def add_service(self, name: str, service: dict) -> None:
        self.compose["services"][name] = service
        port = flag_value(service_argv(service), "--port")
        if port:
            self.ports[(name, port)] = free_port()

    def port(self, service: str) -> int:
        return next(p for (name, _), p in self.ports.items() if name == service)

    def _paths(self, name: str) -> list[tuple[str, str]]:
        """(container path, host path) for a service, longest container path first."""
        pairs = []
        for source, target, _ in service_mounts(self.compose["services"][name], self.host_env):
            host = Path(source).expanduser() if is_bind(source) else self.root / "volumes" / source
            if not is_bind(source):
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
        address = f"{node}:{flag_value(service_argv(self.compose['services'][node]), '--port')}"
        return next((name for name, s in self.compose["services"].items()
                     if flag_value(service_argv(s), "--runtime-api-address") == address), node)

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        service = self.compose["services"][name]
        argv = service_argv(service)
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
        for key, value in {**dockerfile_env(), **service_environment(service, self.host_env)}.items():
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
            signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            signal_group(proc, signal.SIGKILL)
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


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
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


def flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def aggregated(stream: str, phase: str) -> set[str]:
    """The metric names in flwr's 'aggregate_<phase>' summary line of the run's log."""
    lines = stream.splitlines()
    for i, line in enumerate(lines):
        if f"aggregate_{phase}: Received" in line:
            record = lines[i + 1].split("Aggregated MetricRecord:", 1)[1].strip()
            return set(ast.literal_eval(record))
    raise AssertionError(f"no aggregate_{phase} summary in the run's log")


def wait_for_firewall(published: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    from privacy_firewall.watch import read_status

    deadline = time.time() + timeout
    while time.time() < deadline:
        if read_status(published).ready:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the firewall service exited with code {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"the firewall service is not ready after {timeout:.0f} s: {read_status(published)}")
