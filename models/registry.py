"""Model registry: a model is built from a name plus keyword arguments.

Generators are called ``G(z, y)`` and discriminators ``D(x, y)`` (``y`` is ignored / may be None
for unconditional models, ``num_classes=0``).
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

_GENERATORS: Dict[str, Callable[..., nn.Module]] = {}
_DISCRIMINATORS: Dict[str, Callable[..., nn.Module]] = {}


def register_generator(name: str):
    def deco(fn):
        _GENERATORS[name] = fn
        return fn
    return deco


def register_discriminator(name: str):
    def deco(fn):
        _DISCRIMINATORS[name] = fn
        return fn
    return deco


def _build(table: Dict[str, Callable[..., nn.Module]], kind: str, name: str, kwargs) -> nn.Module:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(table)}")
    try:
        return table[name](**kwargs)
    except TypeError as exc:
        raise TypeError(f"{kind} {name!r}: {exc}") from exc


def build_generator(name: str, **kwargs) -> nn.Module:
    return _build(_GENERATORS, "generator", name, kwargs)


def build_discriminator(name: str, **kwargs) -> nn.Module:
    return _build(_DISCRIMINATORS, "discriminator", name, kwargs)


def generator_names():
    return sorted(_GENERATORS)


def discriminator_names():
    return sorted(_DISCRIMINATORS)
