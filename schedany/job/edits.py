"""Live-control edits (docs/live_control.md): what a request may hold, how it is checked
against a run's config, and the config a run has after its applied edits.

A *request* is what ``schedany control`` queues: ``set`` (``PATH=VALUE`` texts, each
parsed and applied exactly like ``--set``), ``cooldown`` or ``stop``. A *record* is a
request as the job applied it: the request's fields plus ``seq`` (its queue number),
``step`` and ``clock`` (the optimizer steps done and the clock's readings when it took
effect) and, for a cooldown, the :class:`~schedany.job.rebuild.Cooldown` it resolved to.
The client checks a request before queuing it and the job checks it again before
applying it, with the same function (:func:`check_request`), so a file dropped into the
queue by hand gets no further than one sent by the command.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .._clock import Clock
from ..config import ConfigError, TrainConfig, build_run, parse_config
from ..config.parsing import apply_overrides, check_int, check_number, parse_override, show
from ..curves import BUILTIN_CURVES, DecayShape
from .rebuild import Cooldown

__all__ = [
    "BUDGET_PATHS",
    "FORMAT",
    "Request",
    "check_request",
    "describe",
    "effective_config",
    "parse_request",
    "resolve_cooldown",
]

FORMAT = "schedany-edit/1"
"""The ``format`` field of every queued request."""
BUDGET_PATHS = ("train.steps", "train.samples", "train.tokens")
"""The train budget: with ``schedules.<key>...``, all that ``set`` may change."""
SHAPES: tuple[str, ...] = get_args(DecayShape)
_MAX_SETS = 64

Command = Literal["set", "cooldown", "stop"]


@dataclass(frozen=True)
class Request:
    """One queued command (see the module docstring)."""

    command: Command
    set: tuple[str, ...] = ()
    """``set``: the ``PATH=VALUE`` texts, applied in order like ``--set``."""
    target: str | None = None
    """``cooldown``: the scheduled key."""
    over: int | None = None
    """``cooldown``: how many units of the key's schedule the cooldown takes."""
    to: float | None = None
    """``cooldown``: the value it ends at; None: the schedule's own end."""
    shape: str = "linear"
    """``cooldown``: ``linear``, ``cosine`` or ``sqrt``."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "command": self.command}
        if self.command == "set":
            out["set"] = list(self.set)
        elif self.command == "cooldown":
            out.update(target=self.target, over=self.over, to=self.to, shape=self.shape)
        return out


_FIELDS = {
    "set": {"format", "command", "set"},
    "cooldown": {"format", "command", "target", "over", "to", "shape"},
    "stop": {"format", "command"},
}


def parse_request(data: Any) -> Request:
    """A :class:`Request` from a queued file's JSON, strictly (unknown fields, types)."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ConfigError("", f"expected a JSON object with format {FORMAT!r}, got {show(data)}")
    command = data.get("command")
    if command not in _FIELDS:
        raise ConfigError("command", f"expected one of set, cooldown, stop, got {show(command)}")
    unknown = sorted(set(data) - _FIELDS[command])
    if unknown:
        raise ConfigError(unknown[0], f"unknown field of a {command} request")
    if command == "set":
        texts = data.get("set")
        if (
            not isinstance(texts, list)
            or not 0 < len(texts) <= _MAX_SETS
            or not all(isinstance(t, str) for t in texts)
        ):
            raise ConfigError(
                "set", f"expected 1 to {_MAX_SETS} PATH=VALUE texts, got {show(texts)}"
            )
        return Request("set", set=tuple(texts))
    if command == "cooldown":
        target = data.get("target")
        if not isinstance(target, str) or not target:
            raise ConfigError("TARGET", f"expected a scheduled key, got {show(target)}")
        to = data.get("to")
        return Request(
            "cooldown", target=target, over=data.get("over"), to=to, shape=data.get("shape")
        )
    return Request("stop")


def _check_set_path(text: str) -> None:
    parts, _ = parse_override(text)
    path = ".".join(parts)
    if (parts[0] == "schedules" and len(parts) >= 2) or path in BUDGET_PATHS:
        return
    raise ConfigError(
        path,
        "live control may only change schedules.<key>... and the train budget ("
        + ", ".join(BUDGET_PATHS)
        + f"); restart the run to change {path}",
    )


def _default_end(config: TrainConfig, target: str) -> float | None:
    spec = config.schedules[target]
    if spec.kind == "curve" and spec.name in BUILTIN_CURVES and "anneal_to_value" in spec.args:
        return float(spec.args["anneal_to_value"])
    return None


def check_request(request: Request, data: Mapping[str, Any]) -> tuple[dict[str, Any], TrainConfig]:
    """Check ``request`` against the config ``data`` (plain, as in ``config.yaml``) and
    return the config after it: the data and its parse. A ``set`` is applied exactly as
    ``--set`` is, then the config is parsed and its schedule built on placeholder
    parameters, as ``schedany validate`` does. Raises :class:`ConfigError` naming the
    path (``schedules.lr.num_warmup_steps``) or the argument (``--over``)."""
    if request.command == "set":
        for text in request.set:
            _check_set_path(text)
        new = apply_overrides(data, request.set)
        config = parse_config(new)
        build_run(config, clock=Clock())
        return new, config
    config = parse_config(copy.deepcopy(dict(data)))
    if request.command == "stop":
        if config.train.checkpoint_dir is None:
            raise ConfigError(
                "train.checkpoint_dir",
                "is null, so the run cannot checkpoint before it stops",
            )
        return dict(data), config
    target = request.target
    if target not in config.schedules:
        raise ConfigError(
            f"schedules.{target}",
            f"not scheduled in this run; scheduled keys: {', '.join(config.schedules)}",
        )
    check_int(request.over, "--over", min=1)
    if request.shape not in SHAPES:
        raise ConfigError(
            "--shape", f"expected one of {', '.join(SHAPES)}, got {show(request.shape)}"
        )
    if request.to is None:
        if _default_end(config, target) is None:
            spec = config.schedules[target]
            raise ConfigError(
                "--to",
                f"required: schedules.{target} is {spec.kind} {spec.name}, which has no "
                "anneal_to_value to end at",
            )
    else:
        check_number(request.to, "--to")
    return dict(data), config


def resolve_cooldown(
    request: Request,
    config: TrainConfig,
    bases: list[float],
    current: list[float],
    clock: Mapping[str, int],
) -> Cooldown:
    """The :class:`Cooldown` a checked request starts now, in the unit of the key's
    schedule: from each group's ``current`` value to ``--to``, or to the schedule's
    ``anneal_to_value`` times the group's base (``bases``: the values before scheduling).
    A group whose base is 0 stays at 0, as any multiplicative schedule keeps it."""
    target = request.target
    assert target is not None and request.over is not None
    unit = config.schedules[target].unit
    fraction = _default_end(config, target)
    ends = []
    for base in bases:
        if base == 0:
            ends.append(0.0)
        elif request.to is None:
            assert fraction is not None  # check_request refused it otherwise
            ends.append(base * fraction)
        else:
            ends.append(float(request.to))
    return Cooldown(
        target=target,
        unit=unit,
        start=int(clock[unit]),
        over=int(request.over),
        shape=request.shape,  # type: ignore[arg-type]
        start_values=tuple(current),
        end_values=tuple(ends),
    )


def effective_config(
    base: Mapping[str, Any], records: Iterable[Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, Cooldown]]:
    """The config data and the live cooldowns after ``records`` (applied edits, in
    order): each ``set`` applied to ``base``; a ``set`` of ``schedules.<key>...`` ends
    that key's cooldown, a later cooldown replaces it."""
    data = copy.deepcopy(dict(base))
    cooldowns: dict[str, Cooldown] = {}
    for record in records:
        if record["command"] == "set":
            data = apply_overrides(data, record["set"])
            for text in record["set"]:
                parts, _ = parse_override(text)
                if parts[0] == "schedules":
                    cooldowns.pop(parts[1], None)
        elif record["command"] == "cooldown":
            cooldowns[record["target"]] = Cooldown.from_dict(record["cooldown"])
    return data, cooldowns


def describe(entry: Mapping[str, Any]) -> str:
    """A request or record as the command that sent it: ``cooldown lr --over 20``."""
    command = entry.get("command")
    if command == "set":
        return "set " + " ".join(entry.get("set") or ())
    if command == "cooldown":
        text = f"cooldown {entry.get('target')} --over {entry.get('over')}"
        if entry.get("to") is not None:
            text += f" --to {entry.get('to')}"
        return text + f" --shape {entry.get('shape')}"
    return str(command)
