"""What a checkpoint may hold, and reading it back without unpickling arbitrary objects.

Plain data (tensors, numbers, strings, None, dicts, lists, tuples) is what
``torch.load(weights_only=True)`` loads. DCP's ``.metadata`` is a pickle that must name
nothing but DCP's own data classes; DCP's non-tensor items (optimizer hyperparameters)
get a ``weights_only=True`` pass before DCP's own loader sees them. Every refusal on load
is a :class:`pickle.UnpicklingError`, which :mod:`schedany.job.checkpoint` reports as its
``CheckpointError``.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

# Exact types: subclasses (numpy floats, namedtuples, defaultdicts, DTensors) would
# pass isinstance and then fail to load with weights_only=True.
_LEAVES = frozenset(
    {Tensor, torch.nn.Parameter, int, float, bool, str, bytes, type(None), torch.dtype}
)


def _check_plain(obj: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first thing ``weights_only=True`` could not load."""
    kind = type(obj)
    if kind in _LEAVES:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}")
            _check_plain(value, f"{where}[{key!r}]" if where else str(key))
        return
    if kind in (list, tuple, torch.Size):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}; only tensors, "
        "numbers, strings, None, dicts, lists and tuples load with weights_only=True"
    )


def plain_bytes(obj: Any, where: str) -> bytes:
    """``torch.save`` of ``obj``; a ``TypeError`` names what would not load, by its path
    from ``where`` (``""``: from the keys of the dict ``obj``)."""
    _check_plain(obj, where)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_plain(data: bytes, where: str) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; ``UnpicklingError`` if it cannot."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
        raise pickle.UnpicklingError(
            f"{where}: cannot be loaded with weights_only=True ({exc})"
        ) from exc


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Loads DCP's ``.metadata`` only if it names nothing but DCP's own data classes."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or (
                module in _METADATA_MODULES
                and isinstance(getattr(sys.modules[module], name, None), type)
            )
            or (module == "pathlib" and name.endswith("Path"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(data: bytes, where: str) -> None:
    """Unpickle DCP's ``.metadata`` against the allowlist; ``UnpicklingError`` if it fails."""
    import torch.distributed.checkpoint.metadata  # noqa: F401  (the allowlist looks in it)

    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{where}: {exc}") from None
    except EOFError:
        raise pickle.UnpicklingError(f"{where}: truncated") from None


def safe_load_planner() -> Any:
    """A DCP ``DefaultLoadPlanner`` that loads non-tensor items only if plain data."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        # DefaultLoadPlanner unpickles non-tensor items with weights_only=False; a
        # weights_only=True pass over the same bytes first refuses anything else.
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            load_plain(value.getvalue(), f"DCP item {read_item.dest_index.fqn}")
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()
