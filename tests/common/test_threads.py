"""The one thread rule (common.threads): torch's threads from the cores a
process really has, shared among the hospitals that run side by side, never
more than Ray reserved for the actor; and the apps use it."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from common import threads
from common.threads import RayReservation, intra_op_threads, threads_for


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("SKINFED_THREADS", raising=False)
    threads.ray_reservation.cache_clear()
    yield
    threads.ray_reservation.cache_clear()
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "side_by_side", "reserved", "cap", "expected"), [
    (16, 1, None, None, 16),
    (16, 4, None, None, 4),  # 4 hospitals on 16 cores
    (16, 4, 2, None, 2),  # ... each reserved 2 CPUs by Ray
    (8, 3, None, None, 2),  # no share above an even one
    (2, 4, None, None, 1),  # more hospitals than cores: one thread each, never zero
    (4, 1, 0.5, None, 1),  # a fraction of a CPU is one thread
    (16, 1, None, 3, 3),  # $SKINFED_THREADS caps
])
def test_the_rule(cores, side_by_side, reserved, cap, expected):
    assert threads_for(cores, side_by_side, reserved, cap) == expected


def test_never_more_threads_than_cores_over_the_hospitals_at_once():
    for cores in range(1, 33):
        for hospitals in range(1, 20):
            for reserved in (None, 1, 2, 3, 8):
                per_hospital = threads_for(cores, hospitals, reserved)
                assert per_hospital >= 1
                if hospitals <= cores:
                    assert per_hospital * hospitals <= cores, (cores, hospitals, reserved)
                if reserved is not None:
                    assert per_hospital <= reserved


def _affinity(monkeypatch, cores: int) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)


def _ray_actor(monkeypatch, cpus: float, node_cpus: float, actor: bool = True) -> None:
    """A stand-in for the ray module as a simulated ClientApp's actor sees it."""
    context = types.SimpleNamespace(get_actor_id=lambda: "a1" if actor else None,
                                    get_assigned_resources=lambda: {"CPU": cpus})
    fake = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context,
                                 cluster_resources=lambda: {"CPU": node_cpus})
    monkeypatch.setitem(sys.modules, "ray", fake)


def test_a_plain_process_takes_its_affinity_not_the_machines_count(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    _affinity(monkeypatch, 6)
    assert threads.ray_reservation() is None
    assert intra_op_threads() == 6
    assert intra_op_threads(side_by_side=4) == 1
    monkeypatch.setenv("SKINFED_THREADS", "2")
    assert intra_op_threads() == 2


def test_a_ray_actor_takes_its_reserved_cpus(monkeypatch):
    _affinity(monkeypatch, 16)
    _ray_actor(monkeypatch, cpus=2, node_cpus=16)
    assert threads.ray_reservation() == RayReservation(cpus=2.0, node_cpus=16.0)
    assert intra_op_threads(side_by_side=4) == 2  # 4 hospitals x 2 reserved CPUs on 16 cores


def test_ray_counting_more_cpus_than_the_process_has_does_not_oversubscribe(monkeypatch):
    """Ray counts the machine's CPUs (here 16) but the process may run on 4
    (taskset): 8 actors of 2 CPUs fit in Ray's eyes, 4 hospitals run at once, and
    they share the 4 real cores."""
    _affinity(monkeypatch, 4)
    _ray_actor(monkeypatch, cpus=2, node_cpus=16)
    assert intra_op_threads(side_by_side=4) == 1
    threads.ray_reservation.cache_clear()
    _ray_actor(monkeypatch, cpus=4, node_cpus=16)  # Ray runs at most 4 actors of 4 CPUs at once
    _affinity(monkeypatch, 16)
    assert intra_op_threads(side_by_side=10) == 4


def test_the_simulations_driver_is_no_ray_actor(monkeypatch):
    """The ServerApp runs in Ray's driver process: no reservation, its own cores."""
    _affinity(monkeypatch, 3)
    _ray_actor(monkeypatch, cpus=1, node_cpus=3, actor=False)
    assert threads.ray_reservation() is None and intra_op_threads() == 3


def test_the_clientapp_sets_torch_from_the_rule(monkeypatch):
    from flwr.app import Context, RecordDict

    from client import app as client_app

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    _affinity(monkeypatch, 8)
    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4},
                        state=RecordDict(), run_config={})
    assert client_app.use_available_cores(simulated) == 2 == torch.get_num_threads()  # 4 hospitals on 8 cores
    deployed = Context(run_id=1, node_id=1, node_config={"deidentified-path": "/published"}, state=RecordDict(),
                       run_config={})
    assert client_app.use_available_cores(deployed) == 8 == torch.get_num_threads()  # one hospital, its cores


def test_the_apps_and_the_launcher_use_the_one_rule():
    """No app counts cores or sets torch's threads by itself."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for path in ("client/app.py", "server/app.py", "skinfed/launch.py"):
        tree = ast.parse((root / path).read_text())
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not attributes & {"set_num_threads", "sched_getaffinity", "cpu_count"}, path
    for path in ("client/app.py", "server/app.py"):
        imported = {a.name for n in ast.walk(ast.parse((root / path).read_text()))
                    if isinstance(n, ast.ImportFrom) and n.module == "common.threads" for a in n.names}
        assert {"intra_op_threads", "use_threads"} <= imported, path


def test_skinfed_run_sizes_ray_by_the_real_cores():
    from pathlib import Path

    from skinfed.launch import flwr_command

    cmd = flwr_command([], Path("."), num_hospitals=4, num_cpus=2, num_gpus=0.0, ray_cpus=6)
    assert cmd[cmd.index("--federation-config") + 1] == (
        "num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.0 init-args-num-cpus=6")


def test_a_ray_module_still_being_imported_is_no_actor(monkeypatch):
    """In the in-process simulation the ServerApp's thread can start while the
    main thread is still importing Ray."""
    _affinity(monkeypatch, 2)
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    assert threads.ray_reservation() is None and intra_op_threads() == 2
