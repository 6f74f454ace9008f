"""The compile checks' builds (nvcc, and Triton for sm_90/sm_80), started when collection ends
and run on a background thread at the lowest CPU priority while the rest of the suite runs.

Why: on CI's two cores those builds are about 900 s of CPU, more than half of the suite's wall
time, while the interpreter tests keep one core busy and leave the other idle. Started ahead,
the builds take that idle core, and the modules that need them run last (they are moved to the
end of the run), so by then most of their work is done. A build runs at nice 19 so that the
tests keep their core: Linux sets niceness per thread, and every compiler process the thread
starts inherits it.

This module is a pytest plugin (conftest.py registers it). A module-scoped fixture made with
`@compile_ahead.build` waits for the result of the build started ahead, or runs its function
then where none was started (a pytest-xdist worker, --collect-only, FUSEFORMER_COMPILE_AHEAD=0).
The result is the same either way, pytest.skip included: an exception raised in the thread is
raised again in the fixture.

If the run stops early (-x, a crash), the builds not started yet are dropped, but the one
under way finishes: its compilers are not killed, and the interpreter waits for it at exit
(one fixture's compiles, a few minutes at most).
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import tempfile
import threading

import pytest

_BUILDS: dict = {}  # (module, fixture name) -> the build function, as the test modules define them
_started: dict = {}  # (module, fixture name) -> its Future, for the builds this session started
_runner: concurrent.futures.ThreadPoolExecutor | None = None
_root: str | None = None
_environ: dict = {}  # os.environ as collection ended, for the builds' compilers
_on_runner = threading.local()  # .ahead is True on the builds' thread


def build(function):
    """`function(tmp_path_factory)` as a module-scoped fixture of the same name that the
    collection may start ahead (see the module docstring)."""
    key = (function.__module__, function.__name__)
    _BUILDS[key] = function

    def fixture(tmp_path_factory):
        future = _started.get(key)
        return function(tmp_path_factory) if future is None else future.result()

    fixture.__doc__ = function.__doc__
    return pytest.fixture(scope="module", name=function.__name__)(fixture)


def environ() -> dict:
    """The environment a build's compiler processes get: on the builds' thread, os.environ as it
    was when collection ended, so that a test's monkeypatch.setenv of that moment cannot reach a
    compiler started meanwhile; elsewhere os.environ as it is."""
    return dict(_environ if getattr(_on_runner, "ahead", False) else os.environ)


def _enabled(config) -> bool:
    return (os.environ.get("FUSEFORMER_COMPILE_AHEAD", "1") != "0"
            and "PYTEST_XDIST_WORKER" not in os.environ  # each worker runs a share: build on demand
            and not config.option.collectonly)


def _module(item):
    return getattr(getattr(item, "module", None), "__name__", None)


def _keys(items) -> list:
    """The ahead builds `items` use, in the order they first ask for them."""
    keys = []
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            key = (_module(item), name)
            if key in _BUILDS and key not in keys:
                keys.append(key)
    return keys


@pytest.hookimpl(trylast=True)  # after -k / -m deselect: only the builds of tests that will run
def pytest_collection_modifyitems(config, items) -> None:
    """Move the modules that use an ahead build to the end of `items` (each keeping its order),
    then start their builds in the order their tests will ask for them."""
    keys = _keys(items)
    if not keys or not _enabled(config):
        return
    last = {module for module, _ in keys}
    items[:] = [i for i in items if _module(i) not in last] + [i for i in items if _module(i) in last]
    global _runner, _root, _environ
    _environ = dict(os.environ)
    _root = tempfile.mkdtemp(prefix="fuseformer-compile-ahead-")
    dirs = _Dirs(pathlib.Path(_root))
    _runner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-ahead",
                                                    initializer=_runner_thread_init)
    for key in _keys(items):
        _started[key] = _runner.submit(_BUILDS[key], dirs)


def pytest_sessionfinish(session) -> None:
    """Drop the builds not started yet, and the build folders once no build runs."""
    if _runner is not None:
        _runner.shutdown(wait=False, cancel_futures=True)
    if _root is not None and all(f.done() for f in _started.values()):
        shutil.rmtree(_root, ignore_errors=True)


def _runner_thread_init() -> None:
    """The builds' thread: marked as theirs (environ), then put at the lowest CPU priority."""
    _on_runner.ahead = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux: the builds share the cores as they would in the fixture
        pass


class _Dirs:
    """tmp_path_factory's mktemp for builds started before any fixture runs."""

    def __init__(self, root: pathlib.Path):
        self.root = root

    def mktemp(self, basename: str, numbered: bool = True) -> pathlib.Path:
        return pathlib.Path(tempfile.mkdtemp(prefix=basename + "-", dir=self.root))
