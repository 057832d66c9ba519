"""Shared pytest configuration of trmath's tests.

Hypothesis profiles (select with the environment variable ``HYPOTHESIS_PROFILE``):

``dev`` (default)
    Quick local runs: few examples, random seeds.
``ci``
    Derandomised (the same examples on every run, so CI is reproducible), no deadline (the
    machines are shared and noisy), ``print_blob`` so that a failure can be replayed locally
    with ``@reproduce_failure``.
``nightly``
    Many examples, for a scheduled long run.

Torch's own intra-op threads are set to 1 for the session (override with the environment
variable ``TRMATH_TEST_TORCH_THREADS``): on the shared 2-core machines torch's OpenMP regions
thrash under load (an elementwise op on 160k doubles measured 12 ms with 2 threads against
0.05 ms with 1), and the tests' reference computations (pure-torch backend, float64 helpers)
are small. The C++ kernels' thread pool (``trmath.set_num_threads``) is separate and unaffected.

Under pytest-xdist each worker runs the CPU kernels with ``max(2, cores // workers)`` threads.

``TRMATH_TESTS_CORE_ONLY=1`` (the sanitizer run, ``.ci/sanitized_pytest.sh``) deselects the
cases that never reach the compiled core: those parametrized with ``backend="torch"`` (the
pure-torch backend).

The autouse fixture :func:`_restore_global_state` puts back the process-wide knobs that tests
touch: the number of threads of the CPU kernels and the test hook ``_ops._FORCE_TORCH`` that
routes CPU tensors to the pure-torch backend.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("dev", max_examples=25, deadline=None, **_COMMON)
settings.register_profile(
    "ci", max_examples=50, derandomize=True, deadline=None, print_blob=True, **_COMMON
)
settings.register_profile("nightly", max_examples=2000, deadline=None, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ.get("TRMATH_TEST_TORCH_THREADS", "1")))
    # Under pytest-xdist (``-n auto``, the README's command) every worker is a process with its
    # own pool of kernel threads: share the cores among the workers, but keep at least 2 threads
    # per worker so that the default (multi-threaded) partition of the rows is what the tests
    # run. ``TRMATH_NUM_THREADS`` (read by the core) wins when set.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "TRMATH_NUM_THREADS" not in os.environ:
        try:
            import trmath
        except Exception:  # the compiled core may be missing (tests of pure-Python parts)
            return
        trmath.set_num_threads(max(2, (os.cpu_count() or 2) // workers))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRMATH_TESTS_CORE_ONLY", "") in ("", "0"):
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (drop if params.get("backend") == "torch" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Restore ``trmath.set_num_threads`` and ``_ops._FORCE_TORCH`` after every test."""
    try:
        import trmath
        from trmath import _ops
    except Exception:  # the compiled core may be missing (tests of pure-Python parts)
        yield
        return
    n_threads = trmath.num_threads()
    force = list(_ops._FORCE_TORCH)
    try:
        yield
    finally:
        _ops._FORCE_TORCH[:] = force
        if trmath.num_threads() != n_threads:
            trmath.set_num_threads(n_threads)


def _run_on_both_paths(fn):
    """``(fn(), fn())``: first on the compiled CPU kernels, then on the pure-torch path that
    serves other devices (``_ops._FORCE_TORCH``)."""
    from trmath import _ops

    a = fn()
    _ops._FORCE_TORCH[0] = True
    try:
        b = fn()
    finally:
        _ops._FORCE_TORCH[0] = False
    return a, b


@pytest.fixture
def on_both_paths():
    """The function ``run(fn) -> (kernel result, torch-path result)`` (parity tests)."""
    return _run_on_both_paths
