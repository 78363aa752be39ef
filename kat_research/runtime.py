"""CPU threads of a job: set torch's intra-op thread count, and warn when the cores are
oversubscribed. Measured on a 2-core machine: with 2 torch threads while another process kept
one core busy, a decode step ran 25-40x slower (600-1100 ms instead of 26 ms), because torch's
threads wait for each other at every operation."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# How far the busy threads (other processes' load + this job's) may exceed the usable cores
# before warning: an idle machine's background load (~0.1-0.3) must not count as contention.
LOAD_SLACK = 0.5


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; all cores where unsupported)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def set_torch_threads(threads: int | None, key: str = "torch_threads") -> int:
    """Set torch's intra-op CPU threads to ``threads`` (None: keep torch's default, which
    follows OMP_NUM_THREADS or else the number of cores); return the count in effect.
    ``key`` is the config key named in errors."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(
                f"{key} must be a whole number >= 1, or null for torch's default; got {threads!r}"
            )
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def oversubscription(
    threads: int,
    *,
    cores: int,
    machine_cores: int,
    load: float | None,
    processes: int = 1,
    key: str = "torch_threads",
) -> str | None:
    """Why ``processes`` x ``threads`` busy torch threads would oversubscribe this process's
    ``cores``, or None if they fit.

    ``load`` is the machine's 1-minute load average (None: unknown) taken before the job's
    threads start; the share falling on this process's cores is ``load * cores /
    machine_cores`` (all of it when the process may use every core).
    """
    wanted = threads * processes
    job = f"{wanted} torch threads" + (
        f" ({processes} processes x {threads})" if processes > 1 else ""
    )
    if wanted > cores:
        return (
            f"{job} on {cores} usable CPU cores: the threads wait for each other at every "
            f"operation; set {key}={max(1, cores // processes)} or fewer."
        )
    if load is None:
        return None
    busy = load * cores / machine_cores
    if busy + wanted <= cores + LOAD_SLACK:
        return None
    free = max(1, int(cores - busy) // processes)
    fix = f"set {key}={free}, or run fewer jobs at once" if free < threads else "run fewer jobs"
    return (
        f"the CPU cores are oversubscribed: other processes keep about {busy:.1f} of the "
        f"{cores} usable cores busy (1-minute load average {load:.2f} on {machine_cores} "
        f"cores), and this job adds {job}. Steps may run many times slower (measured: 25-40x "
        f"with 2 threads on 2 shared cores) and timings are unreliable: {fix}."
    )


def warn_if_oversubscribed(
    threads: int | None = None, processes: int = 1, key: str = "torch_threads"
) -> str | None:
    """Log (and return) a warning when ``processes`` x ``threads`` torch threads (default:
    torch's current count) and the machine's current load exceed this process's cores."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = None
    message = oversubscription(
        torch.get_num_threads() if threads is None else threads,
        cores=usable_cores(),
        machine_cores=os.cpu_count() or usable_cores(),
        load=load,
        processes=processes,
        key=key,
    )
    if message is not None:
        log.warning(message)
    return message
