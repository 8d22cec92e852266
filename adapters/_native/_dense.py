"""Converters for `nn.Dense` / `nn.DenseGeneral` <-> `eqx.nn.Linear` and
`nn.Embed` <-> `eqx.nn.Embedding`."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp

from ._checks import _check_dtype, _check_promote, params_of, skeleton, unsupported
from ._registry import _BY_LINEN, Converter, register_converter


def _dense_checks(module: nn.Module, name: str, variables: dict) -> None:
    _check_dtype(module, name, "eqx.nn.Linear", variables)
    _check_promote(module, name)
    if module.precision is not None:
        raise unsupported(
            name,
            "precision",
            module.precision,
            "eqx.nn.Linear has no precision option",
        )
    if module.dot_general is not None or module.dot_general_cls is not None:
        raise unsupported(
            name,
            "dot_general",
            module.dot_general or module.dot_general_cls,
            "eqx.nn.Linear always uses a plain matmul",
        )


def _linear(kernel: jax.Array, bias: jax.Array | None) -> eqx.nn.Linear:
    """An eqx.nn.Linear holding linen's `(in, out)` kernel (and bias), dtype kept."""
    layer = skeleton(
        eqx.nn.Linear,
        kernel.shape[0],
        kernel.shape[1],
        use_bias=bias is not None,
        dtype=kernel.dtype,
    )
    if bias is None:
        return eqx.tree_at(lambda m: m.weight, layer, kernel.T)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (kernel.T, bias))


def _dense_to_native(module: nn.Dense, variables: dict, convert) -> eqx.nn.Linear:
    name = "nn.Dense"
    _dense_checks(module, name, variables)
    params = params_of(
        variables, name, ("kernel", "bias") if module.use_bias else ("kernel",)
    )
    return _linear(params["kernel"], params["bias"] if module.use_bias else None)


def _linear_from_native(layer: eqx.nn.Linear, state, convert):
    if layer.in_features == "scalar" or layer.out_features == "scalar":
        raise unsupported(
            "eqx.nn.Linear",
            "in/out_features",
            "scalar",
            "nn.Dense maps a feature axis to a feature axis",
        )
    params = {"kernel": layer.weight.T}
    if layer.use_bias:
        params["bias"] = layer.bias
    module = nn.Dense(
        layer.out_features, use_bias=layer.use_bias, param_dtype=layer.weight.dtype
    )
    return module, {"params": params}


def _dense_general_to_native(module: nn.DenseGeneral, variables: dict, convert):
    name = "nn.DenseGeneral"
    features = module.features
    if isinstance(features, (tuple, list)):
        if len(features) != 1:
            raise unsupported(
                name,
                "features",
                features,
                "eqx.nn.Linear maps to one "
                "feature axis; reshape the output of an nn.Dense instead",
            )
        features = features[0]
    if module.axis not in (-1, (-1,)) or module.batch_dims:
        raise unsupported(
            name,
            "axis/batch_dims",
            (module.axis, module.batch_dims),
            "eqx.nn.Linear contracts the last axis only",
        )
    _dense_checks(module, name, variables)
    params = params_of(
        variables, name, ("kernel", "bias") if module.use_bias else ("kernel",)
    )
    kernel = params["kernel"].reshape(-1, features)
    bias = params["bias"].reshape(features) if module.use_bias else None
    return _linear(kernel, bias)


def _embed_to_native(module: nn.Embed, variables: dict, convert) -> eqx.nn.Embedding:
    name = "nn.Embed"
    _check_promote(module, name)
    table = params_of(variables, name, ("embedding",))["embedding"]
    # The lookup computes nothing: `dtype=` only casts the rows, so the table's own
    # dtype is exactly equivalent.
    if module.dtype is not None and jnp.dtype(module.dtype) != table.dtype:
        raise unsupported(
            name,
            "dtype",
            module.dtype,
            f"linen casts the rows of the table ({table.dtype}) to `dtype`, while "
            "eqx.nn.Embedding returns them in the table's dtype",
            "Build the linen layer with `dtype=None` or the table's dtype (the "
            "variables stay the same), or keep it wrapped with `adapters.ToEquinox`",
        )
    return eqx.nn.Embedding(weight=table)


def _embedding_from_native(layer: eqx.nn.Embedding, state, convert):
    num, features = layer.weight.shape
    module = nn.Embed(num, features, param_dtype=layer.weight.dtype)
    return module, {"params": {"embedding": layer.weight}}


register_converter(
    nn.Dense, eqx.nn.Linear, to_native=_dense_to_native, from_native=_linear_from_native
)
register_converter(
    nn.Embed,
    eqx.nn.Embedding,
    to_native=_embed_to_native,
    from_native=_embedding_from_native,
)
# DenseGeneral converts one way only: its Equinox form is an eqx.nn.Linear, which
# converts back to nn.Dense (the same computation).
_BY_LINEN[nn.DenseGeneral] = Converter(
    nn.DenseGeneral, eqx.nn.Linear, _dense_general_to_native, _linear_from_native
)
