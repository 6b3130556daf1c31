"""Settings read from the environment: the examples' worker processes import their app by its
``module:attr`` path, so they get their settings as variables, not Python objects. A bad value
is refused with its variable's name, not half-read."""

from __future__ import annotations

from collections.abc import Mapping


def parse_seconds(
    name: str, raw: str, *, error: type[Exception] = ValueError, unit: str = "seconds"
) -> float:
    """``raw`` (the value of variable ``name``) as a number of seconds (or of ``unit``) more
    than 0.

    >>> parse_seconds("LEASE_S", "2.5")
    2.5
    >>> parse_seconds("LEASE_S", "soon")
    Traceback (most recent call last):
    ...
    ValueError: LEASE_S must be a number of seconds, not 'soon'
    """
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{name} must be a number of {unit}, not {raw!r}") from None
    if not value > 0:  # also refuses nan
        raise error(f"{name} must be more than 0 {unit}, not {raw!r}")
    return value


def env_seconds(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    error: type[Exception] = ValueError,
    unit: str = "seconds",
) -> float:
    """Variable ``name`` of ``env`` as seconds (``parse_seconds``), ``default`` if it is unset
    or empty.

    >>> env_seconds({"LEASE_S": "3"}, "LEASE_S", 30.0), env_seconds({}, "LEASE_S", 30.0)
    (3.0, 30.0)
    """
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    return parse_seconds(name, raw, error=error, unit=unit)
