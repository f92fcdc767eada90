"""The files through which ``schedany control`` talks to a running job, in its
``train.log_dir`` (RUN_DIR); docs/live_control.md, "What is recorded".

::

    RUN_DIR/config.yaml          the config the run started with (edits apply on top)
    RUN_DIR/edits.jsonl          every applied edit, one JSON record per line
    RUN_DIR/control/             0700, made by the job
        listener.json            rank 0's pid, host and working folder while it runs
        status.json              step, clock, budget, scheduled values, state
        refused.jsonl            requests the job refused, with the reason
        queue/                   0700
            .tmp-PID-XXXXXXXX    a request being written by a client
            000007.json          a queued request
            000006.done          the last request handled (it keeps the numbering going)
            000003.refused       a refused request, left for a look

A client writes its request into a temporary file (``O_CREAT | O_EXCL``, mode 0600),
then hard-links it to the next free number: ``link`` fails with ``EEXIST`` where that
name is taken, exactly like ``O_EXCL``, so two clients never share a number, and a
request appears under its name whole or not at all. Numbers only grow: the job keeps
the highest handled one on disk. Every file here is created 0600; the job opens queued
files with ``O_NOFOLLOW`` and reads at most :data:`MAX_REQUEST_BYTES` of a regular file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONTROL = "control"
QUEUE = "queue"
LISTENER = "listener.json"
STATUS = "status.json"
REFUSED = "refused.jsonl"
JOURNAL = "edits.jsonl"
CONFIG = "config.yaml"
MAX_REQUEST_BYTES = 64 * 1024
_NAME = re.compile(r"^(\d{6,})\.(json|done|refused)$")


def control_dir(run_dir: Path) -> Path:
    return run_dir / CONTROL


def queue_dir(run_dir: Path) -> Path:
    return run_dir / CONTROL / QUEUE


def make_private_dir(path: Path) -> None:
    """``path`` as a real folder only its owner may enter (0700); a symlink is refused,
    so the channel never reads or writes outside the run directory."""
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise OSError(f"{path} must be a folder, not a link")
    os.chmod(path, 0o700)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` in a new 0600 file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with os.fdopen(_create(tmp), "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def open_private_append(path: Path, *, truncate: bool) -> Any:
    """A text file for appending lines, created 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    if truncate:
        flags |= os.O_TRUNC
    return os.fdopen(os.open(path, flags, 0o600), "a")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, up to a torn or foreign line."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            break
        if not isinstance(item, dict):
            break
        out.append(item)
    return out


def numbered(queue: Path) -> list[tuple[int, str, str]]:
    """``(number, kind, name)`` of the queue's entries, by number; kind is ``json``
    (queued), ``done`` or ``refused``."""
    out = []
    for name in os.listdir(queue):
        match = _NAME.match(name)
        if match is not None:
            out.append((int(match.group(1)), match.group(2), name))
    return sorted(out)


def has_queued(queue: Path) -> bool:
    """Whether a request waits: one ``listdir``, what the job pays per optimizer step."""
    return any(name.endswith(".json") for name in os.listdir(queue))


def enqueue(queue: Path, request: Mapping[str, Any]) -> str:
    """Queue ``request`` under the next free number; returns its file name."""
    tmp = queue / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with os.fdopen(_create(tmp), "wb") as fh:
        fh.write(json.dumps(dict(request)).encode())
        fh.flush()
        os.fsync(fh.fileno())
    try:
        for _ in range(1000):
            entries = numbered(queue)
            name = f"{(entries[-1][0] + 1) if entries else 1:06d}.json"
            try:
                os.link(tmp, queue / name)
            except FileExistsError:
                continue  # another client took that number first: take the next one
            return name
        raise OSError(f"{queue}: could not find a free request number")
    finally:
        tmp.unlink(missing_ok=True)


def read_request(path: Path) -> Any:
    """A queued file's JSON; ``ValueError`` (with the reason) for anything else: a
    link, not a regular file, too big, not UTF-8 JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"cannot open it ({exc.strerror}; links are refused)") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        data = fh.read(MAX_REQUEST_BYTES + 1)
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"larger than {MAX_REQUEST_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not a complete JSON request ({exc})") from None


def listener_file(run_dir: Path) -> Path:
    return run_dir / CONTROL / LISTENER


def this_listener() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "cwd": os.getcwd()}


def live_listener(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The listener of ``run_dir`` if a run listens there, else None and why not.

    A run listens from the moment rank 0 writes ``control/listener.json`` until it
    removes it at exit. A run killed without cleaning up leaves the file behind, so on
    the same host the process must also still exist; on another host that cannot be
    checked and the file is trusted."""
    path = listener_file(run_dir)
    try:
        info = json.loads(path.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except FileNotFoundError:
        if not run_dir.is_dir():
            return None, f"{run_dir} does not exist"
        return None, f"no run listens in {run_dir} (no {CONTROL}/{LISTENER})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path} is unreadable ({exc})"
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None, f"the run that listened in {run_dir} (pid {pid}) is gone"
        except PermissionError:
            pass  # alive, under another user
    return info, ""
