"""CPU threads of a job: set torch's intra-op thread count, and warn when the cores are
oversubscribed. Measured on a 2-core machine: with 2 torch threads while another process kept
one core busy, a decode step ran 25-40x slower (600-1100 ms instead of 26 ms), because torch's
threads wait for each other at every operation. ``interleaved`` times functions side by side,
for the benchmarks' ratios."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# How far the busy threads (other processes' load + this job's) may exceed the usable cores
# before warning: an idle machine's background load (~0.1-0.3) must not count as contention.
LOAD_SLACK = 0.5


# The machine's load is sampled over this long (/proc/stat): the 1-minute load average lags by
# about a minute, so it still counts jobs that just ended (e.g. a sweep's previous pair).
LOAD_SAMPLE_S = 0.25


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks summed over its
    cores, from /proc/stat; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_load() -> tuple[float | None, str]:
    """Busy cores of the machine now, and how that was measured: /proc/stat sampled over
    ``LOAD_SAMPLE_S``, else the 1-minute load average, else (None, "unknown")."""
    before = cpu_times()
    if before is not None:
        time.sleep(LOAD_SAMPLE_S)
        after = cpu_times()
        if after is not None and after[1] > before[1]:
            share = (after[0] - before[0]) / (after[1] - before[1])
            return share * (os.cpu_count() or 1), f"load over the last {LOAD_SAMPLE_S} s"
    try:
        return os.getloadavg()[0], "1-minute load average"
    except (AttributeError, OSError):  # no load average on this platform
        return None, "unknown"


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
    load_source: str = "1-minute load average",
) -> str | None:
    """Why ``processes`` x ``threads`` busy torch threads would oversubscribe this process's
    ``cores``, or None if they fit.

    ``load`` is the machine's busy cores (None: unknown) measured before the job's threads
    start, as ``load_source`` says; the share falling on this process's cores is ``load *
    cores / machine_cores`` (all of it when the process may use every core).
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
        f"{cores} usable cores busy ({load_source} {load:.2f} on {machine_cores} "
        f"cores), and this job adds {job}. Steps may run many times slower (measured: 25-40x "
        f"with 2 threads on 2 shared cores) and timings are unreliable: {fix}."
    )


def warn_if_oversubscribed(
    threads: int | None = None, processes: int = 1, key: str = "torch_threads"
) -> str | None:
    """Log (and return) a warning when ``processes`` x ``threads`` torch threads (default:
    torch's current count) and the machine's current load exceed this process's cores."""
    load, source = machine_load()
    message = oversubscription(
        torch.get_num_threads() if threads is None else threads,
        cores=usable_cores(),
        machine_cores=os.cpu_count() or usable_cores(),
        load=load,
        processes=processes,
        key=key,
        load_source=source,
    )
    if message is not None:
        log.warning(message)
    return message


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the repeats interleaved to share machine noise."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
