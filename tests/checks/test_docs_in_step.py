"""Claims the docs make about the code, checked against the code so they cannot drift: every
command and option of the CLI is in docs/cli.md with its real default, every page is linked
and every link lands, every broker scheme is in the README."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from taskmill.cli import cli

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = (ROOT / "docs" / "cli.md").read_text("utf-8")
README = (ROOT / "README.md").read_text("utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(group: click.Group, path: str = "taskmill") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{path} {name}")


COMMANDS = dict(commands(cli))


def _long_names(option: click.Option) -> list[str]:
    return [o for o in [*option.opts, *option.secondary_opts] if o.startswith("--")]


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_and_option_is_documented(path: str) -> None:
    command = COMMANDS[path]
    if not isinstance(command, click.Group):
        short = path.removeprefix("taskmill ")  # a subcommand in its group's table
        assert f"`{path}" in CLI_DOC or f"`{short}" in CLI_DOC, f"docs/cli.md lacks `{path}`"
    missing = [
        name
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden
        for name in _long_names(param)
        if name != "--help" and not re.search(rf"`[^`]*{re.escape(name)}\b", CLI_DOC)
    ]
    assert missing == [], f"options of `{path}` missing from docs/cli.md: {missing}"


def _table_defaults(heading: str) -> dict[str, str]:
    """``--option`` -> its default column, from the options table under a heading."""
    section = CLI_DOC.split(heading, 1)[1].split("\n## ", 1)[0]
    found = {}
    for row in re.findall(r"^\| (`[^|]*`) \| ([^|]*) \|", section, re.M):
        for name in re.findall(r"--[\w-]+", row[0]):
            found[name] = row[1].strip().strip("`")
    return found


def test_worker_defaults_in_the_docs_are_the_real_ones() -> None:
    documented = _table_defaults("## `taskmill worker")
    checked = 0
    for param in COMMANDS["taskmill worker"].params:
        if not isinstance(param, click.Option) or param.is_flag:
            continue
        if not isinstance(param.default, int | float | str):
            continue  # no default, or one computed from the app
        for name in _long_names(param):
            if name in documented:
                shown = documented[name]
                if isinstance(param.default, int | float):
                    assert float(shown) == param.default, name
                else:
                    assert shown == param.default, name
                checked += 1
    assert checked >= 4  # the table is still there and parsed


def _links(page: Path) -> Iterator[tuple[str, str]]:
    text = re.sub(r"```.*?```", "", page.read_text("utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" not in target and not target.startswith("mailto:"):
            path, _, anchor = target.partition("#")
            yield path, anchor


def _anchors(page: Path) -> set[str]:
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text("utf-8"), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_lands(page: Path) -> None:
    broken = []
    for path, anchor in _links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(path)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{path}#{anchor}")
    assert broken == [], f"{page.name}: links that go nowhere: {broken}"


def test_every_page_is_linked_from_the_readme() -> None:
    linked = {path for path, _ in _links(ROOT / "README.md")}
    pages = {f"docs/{p.name}" for p in PAGES[1:]}
    assert pages - linked == set()


def test_every_broker_scheme_is_in_the_readme() -> None:
    from taskmill.brokers import broker_from_url
    from taskmill.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        broker_from_url("nope://")
    schemes = re.findall(r"(\w+)://", str(info.value).split("supported schemes:")[1])
    assert len(schemes) >= 6
    for scheme in schemes:
        assert f"`{scheme}://" in README, f"README's broker table lacks {scheme}://"
