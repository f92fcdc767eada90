"""Where a sweep runs: an embedded local Ray, or an existing cluster by address
(docs/tuning.md, "Where it runs"). :func:`ray_session` connects (or starts),
and disconnects at the end; a wrong address fails fast, before Ray is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

_HOST_PORT = re.compile(
    r"^(?:(?P<scheme>ray)://)?(?P<host>\[[0-9a-fA-F:]+\]|[^:/\s]+):(?P<port>\d{1,5})$"
)


class ClusterError(RuntimeError):
    """The Ray cluster named by an address cannot be reached (exit code 1)."""


@dataclass(frozen=True)
class Connection:
    """How a sweep reached Ray, for the closing message."""

    mode: str
    """``"local"`` (started here, stopped at the end) or ``"cluster"``."""
    address: str
    num_cpus: float


def parse_address(address: str, where: str = "--address") -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` / ``ray://host:port`` address, ``None`` for
    ``auto``; a :class:`~schedany.config.ConfigError` naming ``where`` (a bad argument)
    for anything else."""
    if address == "auto":
        return None
    match = _HOST_PORT.match(address.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ConfigError(where, f"expected 'auto', HOST:PORT or ray://HOST:PORT, got {address!r}")
    return match["host"].strip("[]"), int(match["port"])


def _probe(host: str, port: int, address: str, timeout_s: float) -> None:
    """A TCP connect, so a wrong address fails now instead of after Ray's retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            f"cannot reach a Ray cluster at {address} ({reason}). Start one with "
            f"`ray start --head --port {port}`, pass the address it prints, or omit "
            f"--address for a local Ray."
        ) from None


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    probe_timeout_s: float = 3.0,
    num_cpus: int | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> Iterator[Connection]:
    """Connect (or start), yield a :class:`Connection`, and disconnect at the end.

    Only a local Ray started here is stopped by ``ray.shutdown``; leaving a cluster
    only disconnects this driver. ``num_cpus`` sizes a local Ray (default: this
    machine's cores); it is ignored for a cluster. ``env_vars`` are set in every
    worker of this job (a cluster's workers do not see this process's environment).
    A malformed ``address`` (or ``RAY_ADDRESS``) is a
    :class:`~schedany.config.ConfigError`, raised before Ray is imported.
    """
    where = "--address"
    if address is None:
        address, where = os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"
    if address is not None:
        hostport = parse_address(address, where)
        if hostport is not None:
            _probe(*hostport, address, probe_timeout_s)
    import ray  # after the probe: a wrong address fails before this slow import

    if ray.is_initialized():
        raise ClusterError("Ray is already initialised in this process; call ray.shutdown() first")
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if env_vars:
        quiet["runtime_env"] = {"env_vars": dict(env_vars)}
    try:
        if address is None:
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                **quiet,
            )
            mode = "local"
        else:
            ray.init(address=address, **quiet)
            mode = "cluster"
    except ConnectionError as exc:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray sends its token only to a cluster it found itself, never to an
            # address it was given, unless told to.
            hint = (
                " If the cluster uses token authentication (Ray's default for "
                "`ray start`), set RAY_AUTH_MODE=token and the cluster's token in "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token."
            )
        raise ClusterError(f"cannot connect to a Ray cluster at {address}: {exc}.{hint}") from None
    try:
        connection = Connection(
            mode, address or "local", float(ray.cluster_resources().get("CPU", 0.0))
        )
        yield connection
    finally:
        ray.shutdown()
