"""Shared test setup: 8 simulated CPU devices (set before JAX is imported) and small helpers."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity metric used throughout the tests."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# -- skips are failures in CI -------------------------------------------------------------------------
# A skipped parity test (a missing optional package, a platform check) passes silently; CI installs every
# extra, so there it must not happen. `--fail-on-skip` (what .ci/run passes) prints every skip with its
# reason and turns the run's exit status into a failure; locally skips stay skips.
def pytest_addoption(parser):
    parser.addoption("--fail-on-skip", action="store_true",
                     help="exit with a failure if any test or test module was skipped (CI)")


_skips = []


def _record_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):  # a module-level skip (pytest.importorskip at import time)
    _record_skip(report)


def pytest_runtest_logreport(report):  # a skip mark, or pytest.skip() in a fixture or test
    _record_skip(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--fail-on-skip") and _skips:
        terminalreporter.section("skipped tests (--fail-on-skip: the run fails)", sep="=", red=True)
        for line in _skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--fail-on-skip") and _skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
