"""Converters for `nn.Sequential` <-> `eqx.nn.Sequential`, converting each layer."""

import equinox as eqx
import flax.linen as nn

from .._errors import AdapterTypeError
from ._registry import _at, _inside, register_converter


def _sequential_to_native(module: nn.Sequential, variables: dict, convert):
    layers = []
    for i, sub in enumerate(module.layers):
        if isinstance(sub, nn.Module):
            name = sub.name or f"layers_{i}"
            sub_vars = {c: v[name] for c, v in variables.items() if name in v}
            with _inside(f"/{name}"):
                layers.append(convert(sub.clone(parent=None, name=None), sub_vars))
        elif callable(sub):
            layers.append(eqx.nn.Lambda(sub))
        else:
            raise AdapterTypeError(
                f"{_at('nn.Sequential')} layer {i} is not callable: {sub!r}. Each "
                "layer must be a linen module or a function such as `nn.relu` (a "
                "function becomes an `eqx.nn.Lambda`)."
            )
    return eqx.nn.Sequential(layers)


def _sequential_from_native(layer: eqx.nn.Sequential, state, convert):
    modules, variables = [], {}
    for i, sub in enumerate(layer.layers):
        if isinstance(sub, eqx.nn.Lambda):
            modules.append(sub.fn)
            continue
        with _inside(f".layers[{i}]"):
            module, sub_vars = convert(sub)
        modules.append(module)
        for collection, tree in sub_vars.items():
            variables.setdefault(collection, {})[f"layers_{i}"] = tree
    return nn.Sequential(modules), variables


register_converter(
    nn.Sequential,
    eqx.nn.Sequential,
    to_native=_sequential_to_native,
    from_native=_sequential_from_native,
)
