"""The documented examples run, and the generated parts of the docs match the code.

A fenced ```python block in README.md or docs/*.md is tested when the line before it (blank
lines aside) is a marker:

- ``<!-- test -->``: run the block as a script, in a fresh temporary directory;
- ``<!-- test: file NAME -->``: not run; written to NAME in the directory of every later tested
  block of the same document (a module such as ``myapp.py`` that later blocks import);
- ``<!-- test: worker MODULE:ATTR -->``: run the block while a worker for that app runs on a
  thread (as ``taskmill worker MODULE:ATTR`` would, in this process);
- ``<!-- test: pytest -->``: write the block as a test module and run pytest on it in a
  subprocess (for examples that use fixtures);
- ``<!-- test: xfail REASON -->``: run the block and expect it to fail (strict: once the code
  is fixed, the marker must go).

Unmarked blocks are not run: fragments, or examples that need something a test cannot have.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskmill.brokers.base import Broker, Capabilities
from taskmill.brokers.memory import MemoryBroker
from taskmill.brokers.nats import NatsBroker
from taskmill.brokers.postgres import PostgresBroker
from taskmill.brokers.redis import RedisBroker
from taskmill.brokers.sqlite import SQLiteBroker

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_MARKER = re.compile(r"^<!--\s*test(?::\s*(?P<kind>\w+)\s*(?P<arg>.*?))?\s*-->$")
_KINDS = {"run", "file", "worker", "pytest", "xfail"}


@dataclasses.dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    kind: str
    arg: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> Iterator[Block]:
    """The marked python blocks of one document, in order."""
    lines = doc.read_text("utf-8").splitlines()
    marker: re.Match[str] | None = None
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith("```"):
            fence, start = text[: len(text) - len(text.lstrip("`"))], i
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            if marker is not None:
                if text[len(fence) :].strip() != "python":
                    raise AssertionError(
                        f"{doc}:{start + 1}: a test marker before a non-python block"
                    )
                kind = marker["kind"] or "run"
                if kind not in _KINDS:
                    raise AssertionError(f"{doc}:{start + 1}: unknown test marker {kind!r}")
                code = textwrap.dedent("\n".join(body)) + "\n"
                yield Block(doc, start + 2, kind, (marker["arg"] or "").strip(), code)
            marker = None
        elif text:
            marker = _MARKER.match(text)
        i += 1


ALL_BLOCKS = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in ALL_BLOCKS if b.kind != "file"]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working directory, importable, with no taskmill settings from the environment;
    the modules a block imported from it are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TASKMILL_URL", raising=False)
    monkeypatch.delenv("TASKMILL_APP", raising=False)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        if str(tmp_path) in str(getattr(module, "__file__", "") or ""):
            app = getattr(module, "app", None)
            close = getattr(app, "close", None)
            if callable(close):
                close()
            del sys.modules[name]


def _write_files(block: Block, workdir: Path) -> None:
    for b in ALL_BLOCKS:
        if b.doc == block.doc and b.kind == "file" and b.line < block.line:
            (workdir / b.arg).write_text(b.code, "utf-8")


def _exec(block: Block) -> None:
    """Run the block; close any app it left open (an example that failed half-way)."""
    from taskmill import App

    namespace: dict[str, object] = {"__name__": f"docs_example_{block.line}"}
    try:
        exec(compile(block.code, block.name, "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, App):
                value.close()


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_example_runs(block: Block, workdir: Path) -> None:
    _write_files(block, workdir)
    if block.kind == "run":
        _exec(block)
    elif block.kind == "xfail":
        try:
            _exec(block)
        except Exception as exc:
            pytest.xfail(f"{block.arg} ({type(exc).__name__}: {exc})")
        pytest.fail(f"{block.name} now runs: remove its xfail marker ({block.arg})")
    elif block.kind == "worker":
        from taskmill.loader import load_app
        from taskmill.testing import running_worker

        app = load_app(block.arg)
        with running_worker(app):
            _exec(block)
    elif block.kind == "pytest":
        (workdir / f"test_docs_example_{block.line}.py").write_text(block.code, "utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(workdir)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not list(workdir.glob("*.db")), "the example created a database file"


def test_every_doc_has_tested_examples() -> None:
    """A guard against a marker typo silently turning a document's tests off."""
    tested = {b.doc.name for b in ALL_BLOCKS}
    for name in ("README.md", "testing.md", "guarantees.md"):
        assert name in tested, f"{name} has no tested example"


# --- generated tables --------------------------------------------------------------------------

BROKERS: dict[str, type[Broker]] = {
    "memory": MemoryBroker,
    "sqlite": SQLiteBroker,
    "redis": RedisBroker,
    "postgres": PostgresBroker,
    "nats": NatsBroker,
}


def capability_table() -> str:
    """The table between the ``capabilities`` markers of docs/guarantees.md."""
    names = list(BROKERS)
    lines = [
        "| capability | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for f in dataclasses.fields(Capabilities):
        cells = ["yes" if getattr(BROKERS[n].capabilities, f.name) else "no" for n in names]
        lines.append(f"| `{f.name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_capability_table_matches_the_code() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text("utf-8")
    found = re.search(r"<!-- capabilities:begin -->\n(.*?)\n<!-- capabilities:end -->", text, re.S)
    assert found, "docs/guarantees.md lost its capabilities markers"
    expected = capability_table()
    assert found[1] == expected, f"regenerate the table in docs/guarantees.md:\n{expected}"


def test_every_capability_is_explained() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text("utf-8")
    for f in dataclasses.fields(Capabilities):
        assert f"- `{f.name}`:" in text, f"docs/guarantees.md does not explain {f.name}"
