"""Loading named queries from the ``.sql`` files beside the brokers."""

from __future__ import annotations

from importlib import resources


def load_queries(filename: str) -> dict[str, str]:
    """Split a file into ``{name: sql}`` on ``-- name: NAME`` lines; loaded once per broker."""
    text = resources.files("taskmill.brokers").joinpath("sql", filename).read_text("utf-8")
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line.removeprefix("-- name:").strip(), []
        elif name is not None:
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries
