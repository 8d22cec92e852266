"""Converters for `nn.GRUCell` <-> `eqx.nn.GRUCell` and `nn.LSTMCell` <->
`eqx.nn.LSTMCell`."""

import equinox as eqx
import flax.linen as nn
import jax.numpy as jnp

from ._checks import _check_dtype, params_of, skeleton, unsupported
from ._registry import register_converter


def _check_gates(module: nn.Module, name: str) -> None:
    if module.gate_fn is not nn.sigmoid or module.activation_fn is not nn.tanh:
        raise unsupported(
            name,
            "gate_fn/activation_fn",
            (module.gate_fn, module.activation_fn),
            "the Equinox cell uses sigmoid gates and tanh",
        )


def _gru_to_native(module: nn.GRUCell, variables: dict, convert) -> eqx.nn.GRUCell:
    name = "nn.GRUCell"
    _check_gates(module, name)
    _check_dtype(module, name, "eqx.nn.GRUCell", variables)
    gates = ("r", "z", "n")
    expected = [f"i{g}/{w}" for g in gates for w in ("kernel", "bias")]
    expected += [f"h{g}/kernel" for g in gates] + ["hn/bias"]
    p = params_of(variables, name, tuple(expected))
    inputs, hidden = p["ir"]["kernel"].shape
    cell = skeleton(eqx.nn.GRUCell, inputs, hidden, dtype=p["ir"]["kernel"].dtype)
    return eqx.tree_at(
        lambda c: (c.weight_ih, c.weight_hh, c.bias, c.bias_n),
        cell,
        (
            jnp.concatenate([p[f"i{g}"]["kernel"].T for g in gates]),
            jnp.concatenate([p[f"h{g}"]["kernel"].T for g in gates]),
            jnp.concatenate([p[f"i{g}"]["bias"] for g in gates]),
            p["hn"]["bias"],
        ),
    )


def _gru_from_native(cell: eqx.nn.GRUCell, state, convert):
    if not cell.use_bias:
        raise unsupported(
            "eqx.nn.GRUCell",
            "use_bias",
            False,
            "nn.GRUCell always has its input and `hn` biases",
        )
    w_ih = jnp.split(cell.weight_ih, 3)
    w_hh = jnp.split(cell.weight_hh, 3)
    b = jnp.split(cell.bias, 3)
    params = {}
    for i, g in enumerate(("r", "z", "n")):
        params[f"i{g}"] = {"kernel": w_ih[i].T, "bias": b[i]}
        params[f"h{g}"] = {"kernel": w_hh[i].T}
    params["hn"]["bias"] = cell.bias_n
    module = nn.GRUCell(cell.hidden_size, param_dtype=cell.weight_ih.dtype)
    return module, {"params": params}


def _lstm_to_native(module: nn.LSTMCell, variables: dict, convert) -> eqx.nn.LSTMCell:
    name = "nn.LSTMCell"
    _check_gates(module, name)
    _check_dtype(module, name, "eqx.nn.LSTMCell", variables)
    gates = ("i", "f", "g", "o")
    expected = [f"i{g}/kernel" for g in gates]
    expected += [f"h{g}/{w}" for g in gates for w in ("kernel", "bias")]
    p = params_of(variables, name, tuple(expected))
    inputs, hidden = p["ii"]["kernel"].shape
    cell = skeleton(eqx.nn.LSTMCell, inputs, hidden, dtype=p["ii"]["kernel"].dtype)
    return eqx.tree_at(
        lambda c: (c.weight_ih, c.weight_hh, c.bias),
        cell,
        (
            jnp.concatenate([p[f"i{g}"]["kernel"].T for g in gates]),
            jnp.concatenate([p[f"h{g}"]["kernel"].T for g in gates]),
            jnp.concatenate([p[f"h{g}"]["bias"] for g in gates]),
        ),
    )


def _lstm_from_native(cell: eqx.nn.LSTMCell, state, convert):
    if not cell.use_bias:
        raise unsupported(
            "eqx.nn.LSTMCell",
            "use_bias",
            False,
            "nn.LSTMCell always has its hidden biases",
        )
    w_ih = jnp.split(cell.weight_ih, 4)
    w_hh = jnp.split(cell.weight_hh, 4)
    b = jnp.split(cell.bias, 4)
    params = {}
    for i, g in enumerate(("i", "f", "g", "o")):
        params[f"i{g}"] = {"kernel": w_ih[i].T}
        params[f"h{g}"] = {"kernel": w_hh[i].T, "bias": b[i]}
    module = nn.LSTMCell(cell.hidden_size, param_dtype=cell.weight_ih.dtype)
    return module, {"params": params}


register_converter(
    nn.GRUCell, eqx.nn.GRUCell, to_native=_gru_to_native, from_native=_gru_from_native
)
register_converter(
    nn.LSTMCell,
    eqx.nn.LSTMCell,
    to_native=_lstm_to_native,
    from_native=_lstm_from_native,
)
