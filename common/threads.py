"""The one thread rule of the project: how many threads torch may use in a process.

A process gets the cores it may really run on — its CPU affinity (``taskset``,
a container's cpuset), not the machine's count — shared out evenly among the
processes that run side by side on them (the simulation's hospitals), and no
more than the CPUs reserved for it (Ray's ``num_cpus`` for a ClientApp actor,
the simulation's ``client_resources``). More threads than cores only spin and
wait for each other. ``$SKINFED_THREADS``, when set, caps the count too.

:func:`threads_for` is the rule on plain numbers; :func:`intra_op_threads`
gathers this process's numbers; :func:`use_threads` sets torch to them.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

THREADS_VARIABLE = "SKINFED_THREADS"


@dataclass(frozen=True)
class RayReservation:
    """What Ray reserved for the actor this process is: ``cpus`` of the ``node_cpus``
    Ray schedules on this machine."""

    cpus: float
    node_cpus: float

    @property
    def actors_at_once(self) -> int:
        """How many such actors Ray runs side by side on the machine."""
        return max(1, int(self.node_cpus // self.cpus)) if self.cpus > 0 else 1


def threads_for(cores: int, side_by_side: int = 1, reserved_cpus: float | None = None,
                cap: int | None = None) -> int:
    """Threads for one of ``side_by_side`` processes sharing ``cores``: an even
    share of the cores, at most ``reserved_cpus`` (a fraction of a CPU is one
    thread) and at most ``cap``; never fewer than one."""
    threads = max(1, int(cores)) // max(1, int(side_by_side))
    if reserved_cpus is not None:
        threads = min(threads, int(reserved_cpus))
    if cap is not None:
        threads = min(threads, int(cap))
    return max(1, threads)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks outside Linux
        return max(1, os.cpu_count() or 1)


@functools.cache
def ray_reservation() -> RayReservation | None:
    """Ray's reservation for this process when it is a Ray actor (a simulated
    ClientApp), else None. Ray is never imported here: a process that has not
    imported it is no Ray worker."""
    ray = sys.modules.get("ray")
    # Another thread may be importing Ray right now (the in-process simulation's
    # driver): a module without is_initialized yet is no actor's.
    is_initialized = getattr(ray, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver (the simulation's ServerApp), or a plain task
        return None
    cpus = float(context.get_assigned_resources().get("CPU", 0.0))
    if cpus <= 0:
        return None
    return RayReservation(cpus=cpus, node_cpus=float(ray.cluster_resources().get("CPU", cpus)))


def thread_cap() -> int | None:
    """``$SKINFED_THREADS`` as a number, when a person set it."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    return max(1, int(value)) if value else None


def intra_op_threads(side_by_side: int = 1) -> int:
    """Threads for torch in this process, one of ``side_by_side`` like it on this
    machine: inside a Ray actor, at most its reserved CPUs, and the cores shared
    among the actors Ray runs at once (no more than ``side_by_side``)."""
    reservation = ray_reservation()
    if reservation is None:
        return threads_for(available_cores(), side_by_side, cap=thread_cap())
    at_once = min(max(1, side_by_side), reservation.actors_at_once)
    return threads_for(available_cores(), at_once, reserved_cpus=reservation.cpus, cap=thread_cap())


def use_threads(threads: int) -> int:
    """Set torch's intra-op threads (when they differ) and return the count."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
