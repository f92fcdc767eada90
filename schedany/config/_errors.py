"""``ConfigError`` and the helpers that word its messages the same way everywhere."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigError", "did_you_mean", "show", "expected", "unknown_key"]


class ConfigError(ValueError):
    """A config file, spec or ``--set`` override is wrong.

    The message starts with the dotted path of the offending entry, then says what was
    expected and what was found: ``schedules.lr.num_warmup_steps: expected an integer
    >= 0, got -5``. ``path`` holds the dotted path on its own ("" for the whole file);
    ``kind`` says what went wrong without reading the message (``"unknown_key"`` from
    :func:`unknown_key`, else ``"invalid"``).
    """

    def __init__(self, path: str, message: str, *, kind: str = "invalid") -> None:
        self.path = path
        self.reason = message
        self.kind = kind
        super().__init__(f"{path}: {message}" if path else message)


def show(value: Any) -> str:
    """A short rendering of a config value for an error message."""
    if isinstance(value, str):
        text = repr(value)
    elif value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping " + repr(value)
    elif isinstance(value, (list, tuple)):
        text = "a list " + repr(list(value))
    else:
        text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 80 else text[:77] + "..."


def expected(path: str, what: str, value: Any) -> ConfigError:
    """``<path>: expected <what>, got <value>``."""
    return ConfigError(path, f"expected {what}, got {show(value)}")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest candidate (case first), or ""."""
    candidates = list(candidates)
    same_case = [c for c in candidates if c.lower() == str(word).lower()]
    close = same_case or difflib.get_close_matches(str(word), candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(path: str, key: str, allowed: Iterable[str], what: str = "field") -> ConfigError:
    """An unknown key, with the allowed ones and the closest match."""
    allowed = list(allowed)
    hint = did_you_mean(key, allowed)
    where = f"{path}.{key}" if path else key
    message = f"unknown {what}{hint}; expected one of {', '.join(allowed)}"
    return ConfigError(where, message, kind="unknown_key")
