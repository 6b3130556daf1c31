"""Finding an app from a ``module:attribute`` path (the CLI, worker children)."""

from __future__ import annotations

import importlib
import os
import sys

from taskmill.client import AppParts
from taskmill.errors import ConfigurationError


def load_app(path: str) -> AppParts:
    """Import ``package.module:app`` (``:app`` may be left out) and return the App there.

    Typed by what the worker needs of it (its registry and its client), so that the worker's
    process-pool children can load it without this module importing the layer above them."""
    module_name, _, attr = path.partition(":")
    attr = attr or "app"
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        raise ConfigurationError(_not_a_module_path(path, module_name, attr))
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the working directory is importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"cannot import {module_name!r} (from app path {path!r})"
            ) from None
        raise
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, AppParts):
        raise ConfigurationError(f"{path!r} is a {type(obj).__name__}, not a taskmill App")
    return obj


def _not_a_module_path(path: str, module_name: str, attr: str) -> str:
    """``./app.py``, ``src/app.py``: what to write instead."""
    dotted = module_name.removesuffix(".py").replace(os.sep, "/").strip("/")
    while dotted.startswith("./"):
        dotted = dotted[2:]
    dotted = dotted.replace("/", ".")
    return (
        f"{path!r} is a file path; name the app as module:attribute, e.g. {dotted}:{attr} "
        "(imported from the working directory, like python -m)"
    )
