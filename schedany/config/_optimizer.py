"""``optimizer:`` — a ``torch.optim`` class by name, its keyword arguments, named groups."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch.optim
from torch.optim import Optimizer

from ._schema import OptimizerSection
from .parsing import ConfigError, as_mapping, check_number, expected, unknown_key, unknown_name

GROUP_NAMES = ("decay", "no_decay")
_NON_NEGATIVE = ("lr", "weight_decay", "momentum", "eps", "dampening")
_NEEDS_CLOSURE = {"LBFGS"}


def _optimizer_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, Optimizer) and obj is not Optimizer
    )


def optimizer_class(name: str) -> type[Optimizer]:
    return getattr(torch.optim, name)


def _arguments(cls: type[Optimizer]) -> list[str]:
    return [
        n
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _value(value: Any) -> Any:
    # YAML has no tuples; torch's tuple arguments (betas, etas, step_sizes) want them,
    # and a "betas[0]" schedule rebuilds the container with the type it finds.
    return tuple(value) if isinstance(value, list) else value


def _parse_kwargs(
    data: Mapping[str, Any], allowed: list[str], path: str, cls_name: str
) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if key not in allowed:
            raise unknown_key(path, key, allowed, f"argument of torch.optim.{cls_name}")
        if key in _NON_NEGATIVE:
            check_number(value, f"{path}.{key}", min=0.0)
        if key == "betas":
            if not isinstance(value, list) or len(value) != 2:
                raise expected(f"{path}.betas", "a list of two numbers in [0, 1)", value)
            for i, beta in enumerate(value):
                check_number(beta, f"{path}.betas[{i}]", min=0.0)
                if beta >= 1.0:
                    raise expected(f"{path}.betas[{i}]", "a number in [0, 1)", beta)
        out[key] = _value(value)
    return out


def parse_optimizer(data: Any, path: str = "optimizer") -> OptimizerSection:
    data = dict(as_mapping(data, path))
    name = data.pop("name", "AdamW")
    names = _optimizer_names()
    if not isinstance(name, str) or name not in names:
        raise unknown_name(f"{path}.name", name, names, "a class of torch.optim")
    if name in _NEEDS_CLOSURE:
        raise ConfigError(
            f"{path}.name",
            f"{name} needs a closure in step(); the reference trainer calls step() without one",
        )
    allowed = _arguments(optimizer_class(name))
    groups = data.pop("param_groups", None)
    kwargs = _parse_kwargs(data, allowed, path, name)
    parsed_groups = None
    if groups is not None:
        groups = as_mapping(
            groups, f"{path}.param_groups", "a mapping of group name (decay, no_decay) -> overrides"
        )
        parsed_groups = {}
        for group, overrides in groups.items():
            if group not in GROUP_NAMES:
                raise unknown_key(f"{path}.param_groups", group, GROUP_NAMES, "param group")
            where = f"{path}.param_groups.{group}"
            parsed_groups[group] = _parse_kwargs(as_mapping(overrides, where), allowed, where, name)
    return OptimizerSection(name=name, kwargs=kwargs, param_groups=parsed_groups)


def make_optimizer(
    section: OptimizerSection, groups: Sequence[dict[str, Any]], path: str = "optimizer"
) -> Optimizer:
    """Build ``torch.optim.<name>`` over ``groups`` (dicts with ``params`` and maybe
    ``name``), applying each named group's overrides. torch's own argument errors
    become :class:`ConfigError`."""
    cls = optimizer_class(section.name)
    allowed = set(_arguments(cls))
    final = []
    for group in groups:
        # no_decay's default weight_decay=0 is dropped for optimizers without the
        # argument (Rprop, SparseAdam), which would otherwise reject the group.
        group = {k: v for k, v in group.items() if k in ("params", "name") or k in allowed}
        name = group.get("name")
        if section.param_groups is not None and name in section.param_groups:
            group.update(section.param_groups[name])
        final.append(group)
    try:
        return cls(final, **section.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            path, f"torch.optim.{section.name} rejected its arguments: {exc}"
        ) from None


def initial_value(section: OptimizerSection, key: str) -> Any:
    """The value the param groups start with for optimizer argument ``key``: as given in
    the block, else the class's default. ``KeyError`` if the class takes no such argument."""
    if key in section.kwargs:
        return section.kwargs[key]
    cls = optimizer_class(section.name)
    if key not in _arguments(cls):
        raise KeyError(key)
    default = inspect.signature(cls.__init__).parameters[key].default
    return None if default is inspect.Parameter.empty else default


def placeholder_groups(section: OptimizerSection) -> list[dict[str, Any]]:
    """Param groups of one throwaway parameter each, shaped like the real job's: one
    unnamed group, or ``decay`` / ``no_decay`` (``weight_decay`` 0 in ``no_decay``)."""
    if section.param_groups is None:
        return [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    return [
        {"name": "decay", "params": [torch.nn.Parameter(torch.zeros(2, 2))]},
        {"name": "no_decay", "params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0},
    ]
