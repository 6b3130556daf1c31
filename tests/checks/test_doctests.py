"""The examples in taskmill's docstrings run (each module's doctests, one test per module)."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import taskmill

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(taskmill.__path__, "taskmill.")
    if not m.name.endswith(".__main__")  # importing it would run the command line
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an optional dependency (an extra) is not installed
        if exc.name and not exc.name.startswith("taskmill"):
            pytest.skip(f"{name} needs {exc.name}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in finder.find(module, name):
        runner.run(test, out=out.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, out.getvalue()


def test_the_package_has_doctests() -> None:
    """A guard against the finder silently finding nothing."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    assert any(t.examples for t in finder.find(taskmill, "taskmill"))
    assert "taskmill.retry" in MODULES and "taskmill.brokers.sqlite" in MODULES
