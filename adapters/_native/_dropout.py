"""Converters for `nn.Dropout` <-> `eqx.nn.Dropout`."""

import equinox as eqx
import flax.linen as nn

from ._checks import params_of, unsupported
from ._registry import register_converter


def _dropout_to_native(module: nn.Dropout, variables: dict, convert):
    if module.broadcast_dims:
        raise unsupported(
            "nn.Dropout",
            "broadcast_dims",
            module.broadcast_dims,
            "eqx.nn.Dropout drops every element independently",
        )
    params_of(variables, "nn.Dropout", ())
    return eqx.nn.Dropout(module.rate, inference=bool(module.deterministic))


def _dropout_from_native(layer: eqx.nn.Dropout, state, convert):
    return nn.Dropout(layer.p, deterministic=bool(layer.inference)), {}


register_converter(
    nn.Dropout,
    eqx.nn.Dropout,
    to_native=_dropout_to_native,
    from_native=_dropout_from_native,
)
