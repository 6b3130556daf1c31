"""``send`` has the task function's signature (ParamSpec): mypy rejects a wrong call."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TASKS = """
from taskmill import App, JobHandle

app = App("memory://")


@app.task
def add(a: int, b: int) -> int:
    return a + b


@app.task(queue="greetings", retries=2)
async def greet(name: str, *, loud: bool = False) -> str:
    return name.upper() if loud else name


@app.periodic(cron="0 2 * * *", tz="Europe/Paris")
@app.task(retries=1)
def nightly(region: str = "eu") -> int:
    return len(region)


@app.periodic(every=60)
async def tick() -> None: ...


@app.periodic(every=60)
def plain(n: int = 1) -> int:
    return n


def correct() -> None:
    h: JobHandle[int] = add.send(1, 2)
    add.send(a=1, b=2)
    add.options(delay=5, priority=1).send(1, b=2)
    g: JobHandle[str] = greet.send("ann", loud=True)
    r: int = h.result(timeout=1)
    s: int = add(1, 2)
    n: JobHandle[int] = nightly.send("us")
    p: JobHandle[int] = plain.send(2)
    t: JobHandle[None] = tick.send()
    print(g, r, s, n, p, t)


async def correct_async() -> None:
    h: JobHandle[str] = await greet.asend("bob")
    text: str = await h.aresult()
    print(text)
"""

# every line marked "# E" must have a mypy error, and no other line may have one
WRONG = """
from tasks import add, greet, nightly


async def wrong() -> None:
    add.send("1", 2)  # E
    add.send(1)  # E
    add.send(1, 2, 3)  # E
    add.send(1, c=2)  # E
    greet.send("x", loud="yes")  # E
    greet.send("x", True)  # E
    add.options(queue="q").send("x", 2)  # E
    await greet.asend(3)  # E
    x: str = add.send(1, 2).result()  # E
    add("x", 2)  # E
    nightly.send(3)  # E
    print(x)
"""


@pytest.mark.timeout(300)  # mypy is slow on a cold cache
def test_mypy_checks_send_arguments_against_the_task_signature(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(textwrap.dedent(TASKS).lstrip(), "utf-8")
    wrong = textwrap.dedent(WRONG).lstrip()
    (tmp_path / "wrong.py").write_text(wrong, "utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "tasks.py",
            "wrong.py",
        ],
        cwd=tmp_path,  # away from the project's own mypy configuration
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = proc.stdout + proc.stderr
    errors = re.findall(r"^(\w+)\.py:(\d+): error: ", output, re.M)
    expected = {
        ("wrong", str(n)) for n, line in enumerate(wrong.splitlines(), 1) if line.endswith("# E")
    }
    assert set(errors) == expected, output
    assert proc.returncode == 1, output
