"""``schedany control RUN_DIR status | set | cooldown | stop``: the client side of live
control (docs/live_control.md).

A command checks its edit against the run's config as it will be when the edit applies
(``config.yaml``, then the applied edits of ``edits.jsonl``, then the requests still
queued), exactly as ``--set`` is checked, and queues it; the job applies it at its next
optimizer-step boundary. Exit codes: 0 queued (or status printed), 2 the edit does not
validate (the message names the path), 1 no run listens in RUN_DIR.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..config.parsing import as_mapping, read_yaml
from . import _channel as channel
from .edits import Request, check_request, describe, effective_config, parse_request

__all__ = ["NotListening", "control_command", "format_status", "make_request", "status"]


class NotListening(RuntimeError):
    """No run listens in the folder given (exit 1)."""


def _config_now(run_dir: Path, listener: dict[str, Any]) -> dict[str, Any]:
    """The run's config data as it will be once the queued requests apply."""
    base = read_yaml(run_dir / channel.CONFIG)
    data, _ = effective_config(
        as_mapping(base, str(run_dir / channel.CONFIG)),
        channel.read_jsonl(run_dir / channel.JOURNAL),
    )
    path = (data.get("data") or {}).get("path")
    if isinstance(path, str) and not os.path.isabs(path):
        # The run resolves it from its own working folder, not from ours.
        data["data"]["path"] = os.path.join(listener["cwd"], path)
    for request in _queued(run_dir):
        try:
            data, _ = check_request(request, data)
        except ConfigError:
            pass  # the job refuses it when its turn comes
    return data


def _queued(run_dir: Path) -> list[Request]:
    out = []
    queue = channel.queue_dir(run_dir)
    for _, kind, name in channel.numbered(queue) if queue.is_dir() else []:
        if kind == "json":
            try:
                out.append(parse_request(channel.read_request(queue / name)))
            except (ConfigError, ValueError):
                pass
    return out


def control_command(run_dir: str, request: Request) -> str:
    """Check ``request`` against the run listening in ``run_dir`` and queue it; returns
    the queued file's name.

    Raises:
        NotListening: no run listens there.
        ConfigError: the edit does not validate (the message names the path).
    """
    root = Path(run_dir)
    listener, why = channel.live_listener(root)
    if listener is None:
        raise NotListening(why)
    check_request(request, _config_now(root, listener))
    return channel.enqueue(channel.queue_dir(root), request.to_dict())


def status(run_dir: str) -> dict[str, Any]:
    """What ``status`` prints: ``listening`` (and why not), the run's last ``status``
    (step, clock, budget, scheduled values per group, cooldowns), and the ``pending``,
    ``applied`` and ``refused`` edits."""
    root = Path(run_dir)
    listener, why = channel.live_listener(root)
    try:
        last = json.loads((channel.control_dir(root) / channel.STATUS).read_text())
    except (OSError, ValueError):
        last = None
    queue = channel.queue_dir(root)
    pending = []
    for number, kind, name in channel.numbered(queue) if queue.is_dir() else []:
        if kind == "json":
            try:
                body = channel.read_request(queue / name)
            except ValueError as exc:
                body = {"command": f"unreadable ({exc})"}
            pending.append({"seq": number, **(body if isinstance(body, dict) else {})})
    return {
        "run_dir": str(root),
        "listening": listener is not None,
        "why_not": why,
        "listener": listener,
        "status": last,
        "pending": pending,
        "applied": channel.read_jsonl(root / channel.JOURNAL),
        "refused": channel.read_jsonl(channel.control_dir(root) / channel.REFUSED),
    }


def _clock(clock: dict[str, int]) -> str:
    return "  ".join(f"{unit} {n}" for unit, n in clock.items())


def format_status(info: dict[str, Any]) -> list[str]:
    """:func:`status` as the lines ``schedany control RUN_DIR status`` prints."""
    lines = []
    last = info["status"]
    if info["listening"]:
        who = info["listener"]
        lines.append(f"{info['run_dir']}: listening (pid {who['pid']} on {who['host']})")
    else:
        lines.append(f"{info['run_dir']}: not listening: {info['why_not']}")
    if last is not None:
        age = time.time() - float(last["updated"])
        lines.append(f"state      {last['state']} (written {age:.1f} s ago)")
        lines.append(f"step       {last['step']}")
        lines.append(f"clock      {_clock(last['clock'])}")
        ((unit, amount),) = last["budget"].items()
        lines.append(f"budget     {amount} {unit}")
        lines.append("schedules  (the values the next optimizer step uses)")
        width = max(len(key) for key in last["schedules"])
        for key, groups in last["schedules"].items():
            values = "  ".join(f"{label} {value:.6g}" for label, value in groups.items())
            lines.append(f"  {key.ljust(width)}  {values}")
        for key, c in last.get("cooldowns", {}).items():
            lines.append(
                f"  {key} cools down over {c['over']} {c['unit']} from {c['unit']} "
                f"{c['start']} ({c['shape']}): {c['start_values']} -> {c['end_values']}"
            )
    for title, entries in (("pending", info["pending"]), ("applied", info["applied"])):
        lines.append(f"{title} edits" + ("" if entries else ": none"))
        for entry in entries:
            where = ""
            if "step" in entry:
                where = f"  after step {entry['step']} ({_clock(entry['clock'])})"
            lines.append(f"  {entry['seq']:06d}  {describe(entry)}{where}")
    if info["refused"]:
        lines.append("refused edits")
        for entry in info["refused"]:
            lines.append(f"  {entry['seq']:06d}  at step {entry['step']}: {entry['reason']}")
    return lines


def make_request(
    action: str,
    *,
    sets: Sequence[str] = (),
    target: str | None = None,
    over: int | None = None,
    to: float | None = None,
    shape: str = "linear",
) -> Request:
    """The request of a ``set``, ``cooldown`` or ``stop`` command line."""
    if action == "set":
        return Request("set", set=tuple(sets))
    if action == "cooldown":
        return Request("cooldown", target=target, over=over, to=to, shape=shape)
    return Request("stop")
