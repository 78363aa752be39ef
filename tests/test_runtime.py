"""CPU thread hygiene: torch's thread count from the config, and the oversubscription warning
(load average and affinity monkeypatched to hand-picked values)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from kat_research import runtime
from kat_research.runtime import oversubscription, set_torch_threads, warn_if_oversubscribed


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_set_or_left_alone(restore_threads):
    torch.set_num_threads(2)
    assert set_torch_threads(None) == 2 and torch.get_num_threads() == 2
    assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_name_the_key(bad, restore_threads):
    with pytest.raises(ValueError, match=r"torch_threads must be a whole number >= 1, or null"):
        set_torch_threads(bad)


def test_more_threads_than_usable_cores():
    message = oversubscription(4, cores=2, machine_cores=8, load=0.0)
    assert message.startswith("4 torch threads on 2 usable CPU cores")
    assert "set torch_threads=2 or fewer" in message
    message = oversubscription(2, cores=2, machine_cores=2, load=0.0, processes=2)
    assert "4 torch threads (2 processes x 2) on 2 usable" in message
    assert "torch_threads=1 or fewer" in message


def test_idle_machine_is_not_oversubscribed():
    # background load 0.3 + 2 threads = 2.3 <= 2 cores + slack 0.5
    assert oversubscription(2, cores=2, machine_cores=2, load=0.3) is None
    assert oversubscription(2, cores=2, machine_cores=2, load=None) is None


def test_busy_cores_warn_and_suggest_the_free_ones():
    # the measured case: another process keeps one of the two cores busy, torch wants both
    message = oversubscription(2, cores=2, machine_cores=2, load=1.0)
    assert "other processes keep about 1.0 of the 2 usable cores busy" in message
    assert "(1-minute load average 1.00 on 2 cores), and this job adds 2 torch threads" in message
    assert message.endswith("set torch_threads=1, or run fewer jobs at once.")
    assert oversubscription(1, cores=2, machine_cores=2, load=1.0) is None  # 2 <= 2.5
    # already one thread on fully loaded cores: only fewer jobs help
    assert oversubscription(1, cores=2, machine_cores=2, load=2.0).endswith("run fewer jobs.")


def test_load_is_shared_over_the_machine_for_a_core_subset():
    # 4 of 64 cores usable, machine load 40: about 40 * 4 / 64 = 2.5 of our cores are busy
    assert oversubscription(2, cores=4, machine_cores=64, load=40.0) is None  # 4.5 <= 4.5
    message = oversubscription(3, cores=4, machine_cores=64, load=40.0)
    assert "keep about 2.5 of the 4 usable cores busy" in message
    assert "set torch_threads=1," in message  # int(4 - 2.5) = 1 free core


def fake_machine(monkeypatch, *, cores: set[int], machine_cores: int, load: float | None):
    monkeypatch.setattr(runtime, "cpu_times", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: machine_cores)

    def getloadavg():
        if load is None:
            raise OSError("load average unobtainable")
        return (load, 0.0, 0.0)

    monkeypatch.setattr(os, "getloadavg", getloadavg)


def test_warning_reads_affinity_and_load_and_logs(monkeypatch, caplog):
    fake_machine(monkeypatch, cores={0, 1}, machine_cores=16, load=14.0)  # 1.75 of 2 busy
    assert runtime.usable_cores() == 2
    with caplog.at_level(logging.WARNING, logger="kat_research.runtime"):
        message = warn_if_oversubscribed(threads=1, processes=1)
    assert "keep about 1.8 of the 2 usable cores busy" in message
    assert caplog.messages == [message]


def test_no_warning_without_load_average_when_threads_fit(monkeypatch, caplog):
    fake_machine(monkeypatch, cores={0, 1, 2, 3}, machine_cores=4, load=None)
    with caplog.at_level(logging.WARNING, logger="kat_research.runtime"):
        assert warn_if_oversubscribed(threads=4) is None
        assert "5 torch threads" in warn_if_oversubscribed(threads=5)
    assert len(caplog.messages) == 1


def test_load_is_sampled_from_proc_stat_when_there_is_one(monkeypatch):
    """Busy share over the sample x cores: 3 of 4 ticks busy on a 2-core machine = 1.5 cores;
    the lagging 1-minute load average is not read."""
    samples = iter([(100.0, 1000.0), (103.0, 1004.0)])
    monkeypatch.setattr(runtime, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(runtime, "LOAD_SAMPLE_S", 0.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: pytest.fail("load average read"))
    load, source = runtime.machine_load()
    assert load == pytest.approx(1.5) and source == "load over the last 0.0 s"


def test_cpu_times_reads_this_machine():
    times = runtime.cpu_times()
    if times is None:
        pytest.skip("no /proc/stat on this platform")
    busy, total = times
    assert 0 <= busy <= total
