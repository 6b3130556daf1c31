"""Checks of what taskmill promises outside its own runtime: that users' typed code type-checks
as documented (mypy in a subprocess), that the docs' examples and docstring examples run, and
that the docs' generated parts and claims match the code. Slower than ``tests/unit`` (they start
interpreters and read every page), and kept out of it so that tier stays fast and pure."""
