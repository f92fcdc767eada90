"""Schedule targets: a param_group key (``"weight_decay"``) or one element of a
tuple/list key (``"betas[0]"``), read and written in place."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from .errors import TargetKeyError, TargetTypeError, TargetValueError, closest, is_real

NEW_KEY_HINT = "Pass default_value=... or call extend_optimizer() to add a new key."

_ELEMENT = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<index>\d+)\]$")


def is_numeric(value: Any) -> bool:
    """A real scalar (:func:`schedany.errors.is_real`) or a one-element tensor."""
    return is_real(value) or (isinstance(value, Tensor) and value.numel() == 1)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """The library's hint: ``"; did you mean 'X'?"``, or ``""``."""
    close = closest(word, candidates)
    return f"; did you mean {close!r}?" if close else ""


@dataclass(frozen=True)
class Target:
    """Where a schedule reads and writes its value inside one param group."""

    name: str  # as the user wrote it: "lr", "betas[0]"
    key: str  # the param_group key: "lr", "betas"
    index: int | None = None  # element of a tuple/list value, or None

    def read(self, group: dict[str, Any]) -> Any:
        value = group[self.key]
        return value if self.index is None else value[self.index]

    def write(self, group: dict[str, Any], value: Any) -> None:
        if self.index is None:
            group[self.key] = value
            return
        # Tuples are immutable: rebuild the container with the same type.
        items = list(group[self.key])
        items[self.index] = value
        group[self.key] = type(group[self.key])(items)

    def validate(self, optimizer: Optimizer, where: str = "schedule_target") -> None:
        """Raise a :class:`~schedany.errors.TargetError` unless every param group holds
        a numeric value here."""
        for i, group in enumerate(optimizer.param_groups):
            if self.key not in group:
                keys = [k for k in group if k != "params"]
                raise TargetKeyError(
                    where,
                    self.name,
                    f"param_groups[{i}] has no key {self.key!r} (it has {sorted(keys)})"
                    f"{did_you_mean(self.key, keys) or '.'}",
                    missing_key=self.key,
                    hint=NEW_KEY_HINT,
                )
            value = group[self.key]
            if self.index is not None:
                if not isinstance(value, (tuple, list)):
                    raise TargetTypeError(
                        where,
                        self.name,
                        f"param_groups[{i}][{self.key!r}] is {type(value).__name__} "
                        f"{value!r}, not a tuple or list to index",
                    )
                if self.index >= len(value):
                    raise TargetValueError(
                        where,
                        self.name,
                        f"index {self.index} is out of range for param_groups[{i}]"
                        f"[{self.key!r}]={tuple(value)!r} of length {len(value)}",
                    )
                value = value[self.index]
            if not is_numeric(value):
                raise TargetTypeError(
                    where,
                    self.name,
                    f"param_groups[{i}] holds a non-numeric {type(value).__name__} there "
                    f"({_short(value)}); only real scalars can be scheduled",
                )


def parse_target(name: Any, where: str = "schedule_target") -> Target:
    """``"weight_decay"`` -> key; ``"betas[0]"`` -> element 0 of ``betas``."""
    if not isinstance(name, str) or not name:
        raise TargetTypeError(
            where, name, "expected a non-empty string such as 'weight_decay' or 'betas[0]'"
        )
    match = _ELEMENT.match(name)
    if match:
        return Target(name=name, key=match["key"], index=int(match["index"]))
    if "[" in name or "]" in name:
        raise TargetValueError(
            where, name, "is malformed; write one element as 'key[index]', e.g. 'betas[0]'"
        )
    return Target(name=name, key=name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
