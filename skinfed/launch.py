"""`skinfed-run`: one federated simulation with `flwr run`, sized from the Hydra config.

    skinfed-run                                   # 4 hospitals, embedded model, the defaults
    skinfed-run federation.num_hospitals=20 federation.num_rounds=5
    skinfed-run backend=sd3 firewall.backend.model_path=/models/sd3 federation.client_resources.num_gpus=0.25

It composes ``conf/`` with the overrides (a bad key fails here, before anything
starts), then runs

    flwr run . --stream --run-config 'overrides="..."' \\
        --federation-config 'num-supernodes=N client-resources-num-cpus=C client-resources-num-gpus=G init-args-num-cpus=K'

so the number of simulated SuperNodes always equals federation.num_hospitals
(DEFAULT_HOSPITALS when it is null: plain `flwr run .` starts Flower's default of 2),
and Ray schedules the hospitals on the K cores this process may really run on
(its affinity; Ray itself would count every core of the machine): at most K / C
hospitals train at once, each with C threads (common.threads).
flwr starts a local SuperLink in the background when none is running; this
command stops the one it started (``--keep-superlink`` leaves it for the next
run). Exit code 0 when the run finished and wrote its results, 1 when it did
not, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]
#: Hospitals of the main job when federation.num_hospitals is null.
DEFAULT_HOSPITALS = 4
RESULTS_LINE = re.compile(r"results in (\S+)")
SUPERLINK_HEALTH = "http://127.0.0.1:{port}/health"


def flwr_command(overrides: list[str], app_dir: Path, num_hospitals: int, num_cpus: float, num_gpus: float,
                 ray_cpus: int | None = None) -> list[str]:
    """The `flwr run` command line for these overrides; ``ray_cpus``: the CPUs Ray
    may schedule the hospitals on (None: Ray's own count)."""
    flwr = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    run_config = "overrides=" + json.dumps(" ".join(_quote(o) for o in overrides))  # a TOML string
    federation = f"num-supernodes={num_hospitals} client-resources-num-cpus={num_cpus} client-resources-num-gpus={num_gpus}"
    if ray_cpus is not None:
        federation += f" init-args-num-cpus={int(ray_cpus)}"
    return [flwr, "run", str(app_dir), "--stream", "--run-config", run_config, "--federation-config", federation]


def _quote(override: str) -> str:
    import shlex

    return shlex.quote(override)


def superlink_running(port: int) -> bool:
    try:
        with urllib.request.urlopen(SUPERLINK_HEALTH.format(port=port), timeout=1.0):
            return True
    except OSError:
        return False


def superlink_pids(port: int) -> set[int]:
    """The local simulation SuperLink listening on ``port`` (flwr starts it with
    ``--simulation ... --port PORT``); SuperLinks of other runs are left alone."""
    if not Path("/proc").is_dir():  # macOS and friends: ask pgrep
        pattern = f"flower-superlink.*--simulation.*--port {port}( |$)"
        try:
            out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return set()
        return {int(x) for x in out.split()}
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        args = _cmdline(proc).split(b"\0")
        if not any(a.endswith(b"flower-superlink") for a in args) or b"--simulation" not in args:
            continue
        if b"--port" in args and args.index(b"--port") + 1 < len(args) and args[args.index(b"--port") + 1] == str(port).encode():
            pids.add(int(proc.name))
    return pids


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def stop_superlinks(pids: set[int], timeout: float = 20.0) -> None:
    """SIGTERM the SuperLinks we started (their SuperExec and Ray exit with them)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None, log_file: str | Path | None = None) -> int:
    """Run one federation; ``log_file`` also receives everything printed."""
    parser = argparse.ArgumentParser(prog="skinfed-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, key=value")
    parser.add_argument("--app", default=str(APP_DIR), help="the Flower app folder (default: this project)")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running afterwards")
    args = parser.parse_args(argv)

    from common.config import reject_foreign_overrides
    from common.threads import available_cores
    from skinfed.config import RUN_PARTS, ConfigError, load_run_config

    try:
        reject_foreign_overrides(args.overrides, RUN_PARTS, "skinfed-run")  # e.g. sweep.*: before any work
        cfg = load_run_config(args.overrides)
    except ConfigError as exc:
        print(f"skinfed-run: error: {exc}", file=sys.stderr)
        return 2
    if any('"' in o for o in args.overrides):
        print("skinfed-run: error: flwr's run config cannot carry double quotes: quote override values with "
              "single quotes (key='a b')", file=sys.stderr)
        return 2
    res = cfg.federation.client_resources
    hospitals = cfg.federation.num_hospitals or DEFAULT_HOSPITALS
    # At least one hospital's reservation, so that one always fits (then it runs alone).
    ray_cpus = max(available_cores(), int(res.num_cpus))
    cmd = flwr_command(args.overrides, Path(args.app), hospitals, res.num_cpus, res.num_gpus, ray_cpus=ray_cpus)

    env = dict(os.environ)
    # The project is installed already: no per-run `uv sync` of torch & co. No telemetry.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # flower-superlink of this venv
    port = int(env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))
    before = superlink_pids(port) if superlink_running(port) else set()

    print(f"skinfed-run: {hospitals} hospitals, {cfg.federation.num_rounds} rounds, "
          f"{cfg.federation.strategy}, backend {cfg.firewall.backend.name}", flush=True)
    results: str | None = None
    failed = False
    try:
        proc = subprocess.Popen(cmd, cwd=args.app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        log = open(log_file, "a", encoding="utf-8") if log_file else None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if log:
                log.write(line)
            if (m := RESULTS_LINE.search(line)) and "done:" in line:
                results = m.group(1)
            if "Exit Code: 7" in line or "An unhandled exception occurred" in line:
                failed = True
        proc.wait()
        if log:
            log.close()
    except KeyboardInterrupt:
        print("\nskinfed-run: interrupted; resume with federation.resume=latest", file=sys.stderr)
        return 130
    finally:
        if not args.keep_superlink:
            stop_superlinks(superlink_pids(port) - before)
    if proc.returncode != 0 or failed or results is None:
        print("skinfed-run: the run did not finish (see the log above)", file=sys.stderr)
        return 1
    print(f"skinfed-run: results in {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
