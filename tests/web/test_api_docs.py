"""docs/api.md describes every route of the OpenAPI schema, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from taskmill.web.api import openapi_schema

DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text("utf-8")


def test_every_route_of_the_schema_has_a_section_with_an_example() -> None:
    sections = re.split(r"^### ", DOC, flags=re.M)[1:]
    documented = {}
    for section in sections:
        heading = re.match(r"`(GET|POST) (\S+)`\n", section)
        assert heading, f"a route heading is written `METHOD /path`: {section[:60]!r}"
        documented[(heading[1], heading[2])] = section
    in_schema = {
        (method.upper(), path)
        for path, operations in openapi_schema()["paths"].items()
        for method in operations
    }
    assert set(documented) == in_schema
    for (method, path), section in documented.items():
        if path != "/api/v1/openapi.json":
            assert "```console" in section, f"{method} {path} has no example"
