"""A time cap per test, as a pytest plugin loaded by name (no conftest, no extra package).

    python -m pytest -p bench.pytest_time_cap --time-cap 120 ...

A test still running after --time-cap seconds fails with TestTimeCapExceeded
(raised by SIGALRM in the test's thread), so one hung or very slow test costs
at most the cap and the run goes on (or stops, under -x).  A test blocked inside
native code (a hung kernel, a deadlock in C) only sees the signal when it returns
to Python: the GPU session's per-step deadline, which kills the whole process
group, is the backstop for that.  Where SIGALRM does not exist (Windows) or the
test runs off the main thread, the cap is not applied.
"""
from __future__ import annotations

import signal
import threading

import pytest


class TestTimeCapExceeded(Exception):
    """The test ran longer than --time-cap seconds."""

    __test__ = False  # not a test class, whatever its name


def pytest_addoption(parser):
    parser.addoption("--time-cap", type=float, default=0.0,
                     help="fail a test that runs longer than this many seconds (0: no cap; bench.pytest_time_cap)")


def _cap_applies(config) -> float:
    cap = config.getoption("--time-cap")
    if not cap or cap <= 0 or not hasattr(signal, "SIGALRM"):
        return 0.0
    if threading.current_thread() is not threading.main_thread():
        return 0.0
    return cap


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    cap = _cap_applies(item.config)
    if not cap:
        yield
        return

    def expired(signum, frame):
        raise TestTimeCapExceeded(f"{item.nodeid} ran longer than the cap of {cap:g} s (--time-cap)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
