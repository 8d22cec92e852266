"""Converters for `nn.Conv` <-> `eqx.nn.Conv` and `nn.ConvTranspose` <->
`eqx.nn.ConvTranspose`."""

from typing import Any

import equinox as eqx
import flax.linen as nn
import jax.numpy as jnp

from ._checks import (
    _check_dtype,
    _check_promote,
    _refuse_set,
    params_of,
    skeleton,
    unsupported,
)
from ._registry import register_converter


def _padding(padding: Any, kernel_size: tuple[int, ...], name: str) -> Any:
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise unsupported(
            name,
            "padding",
            padding,
            "only SAME, VALID and explicit padding have an eqx.nn.Conv equivalent",
        )
    if isinstance(padding, int):
        return tuple((padding, padding) for _ in kernel_size)
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _conv_to_native(module: nn.Conv, variables: dict, convert) -> eqx.nn.Conv:
    name = "nn.Conv"
    _refuse_set(
        module,
        name,
        ("mask", "precision", "conv_general_dilated"),
        "eqx.nn.Conv has no such option",
    )
    if module.conv_general_dilated_cls is not None:
        raise unsupported(
            name,
            "conv_general_dilated_cls",
            module.conv_general_dilated_cls,
            "eqx.nn.Conv has no such option",
        )
    _check_dtype(module, name, "eqx.nn.Conv", variables)
    _check_promote(module, name)
    params = params_of(
        variables, name, ("kernel", "bias") if module.use_bias else ("kernel",)
    )
    kernel = params["kernel"]  # (*spatial, in / groups, out)
    spatial = kernel.ndim - 2
    tup = lambda v: (v,) * spatial if isinstance(v, int) else tuple(v)  # noqa: E731
    if any(d != 1 for d in tup(module.input_dilation or 1)):
        raise unsupported(
            name,
            "input_dilation",
            module.input_dilation,
            "eqx.nn.Conv dilates the kernel only",
        )
    groups = module.feature_group_count
    layer = skeleton(
        eqx.nn.Conv,
        spatial,
        kernel.shape[-2] * groups,
        kernel.shape[-1],
        kernel.shape[:-2],
        stride=tup(module.strides or 1),
        padding=_padding(module.padding, kernel.shape[:-2], name),
        dilation=tup(module.kernel_dilation or 1),
        groups=groups,
        use_bias=module.use_bias,
        dtype=kernel.dtype,
    )
    weight = jnp.moveaxis(kernel, (-1, -2), (0, 1))  # (out, in / groups, *spatial)
    if module.use_bias:
        bias = params["bias"].reshape((-1,) + (1,) * spatial)
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias))
    return eqx.tree_at(lambda m: m.weight, layer, weight)


def _conv_from_native(layer: eqx.nn.Conv, state, convert):
    if layer.padding_mode != "ZEROS":
        raise unsupported(
            "eqx.nn.Conv",
            "padding_mode",
            layer.padding_mode,
            "nn.Conv pads with zeros (or CIRCULAR, not converted)",
        )
    kernel = jnp.moveaxis(layer.weight, (0, 1), (-1, -2))
    params = {"kernel": kernel}
    if layer.use_bias:
        params["bias"] = layer.bias.reshape(-1)
    module = nn.Conv(
        layer.out_channels,
        tuple(layer.kernel_size),
        strides=tuple(layer.stride),
        padding=layer.padding
        if isinstance(layer.padding, str)
        else tuple(tuple(p) for p in layer.padding),
        kernel_dilation=tuple(layer.dilation),
        feature_group_count=layer.groups,
        use_bias=layer.use_bias,
        param_dtype=layer.weight.dtype,
    )
    return module, {"params": params}


def _conv_transpose_to_native(module: nn.ConvTranspose, variables: dict, convert):
    name = "nn.ConvTranspose"
    _refuse_set(
        module,
        name,
        ("mask", "precision", "preferred_element_type"),
        "eqx.nn.ConvTranspose has no such option",
    )
    if module.transpose_kernel:
        raise unsupported(
            name,
            "transpose_kernel",
            True,
            "eqx.nn.ConvTranspose uses linen's default kernel layout",
        )
    padding = module.padding
    if not (isinstance(padding, str) and padding.upper() in ("SAME", "VALID")):
        raise unsupported(
            name,
            "padding",
            padding,
            "linen pads the dilated input "
            "where Equinox pads like the forward convolution; only "
            "SAME and VALID mean the same in both",
        )
    _check_dtype(module, name, "eqx.nn.ConvTranspose", variables)
    _check_promote(module, name)
    params = params_of(
        variables, name, ("kernel", "bias") if module.use_bias else ("kernel",)
    )
    kernel = params["kernel"]  # (*spatial, in, out)
    spatial = kernel.ndim - 2
    tup = lambda v: (v,) * spatial if isinstance(v, int) else tuple(v)  # noqa: E731
    layer = skeleton(
        eqx.nn.ConvTranspose,
        spatial,
        kernel.shape[-2],
        kernel.shape[-1],
        kernel.shape[:-2],
        stride=tup(module.strides or 1),
        padding=padding.upper(),
        dilation=tup(module.kernel_dilation or 1),
        use_bias=module.use_bias,
        dtype=kernel.dtype,
    )
    weight = jnp.moveaxis(kernel, (-1, -2), (0, 1))  # (out, in, *spatial), no flip
    if module.use_bias:
        bias = params["bias"].reshape((-1,) + (1,) * spatial)
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias))
    return eqx.tree_at(lambda m: m.weight, layer, weight)


def _conv_transpose_from_native(layer: eqx.nn.ConvTranspose, state, convert):
    name = "eqx.nn.ConvTranspose"
    if not isinstance(layer.padding, str) and any(
        tuple(p) != (0, 0) for p in layer.padding
    ):
        raise unsupported(
            name,
            "padding",
            layer.padding,
            "only SAME and VALID (or no padding) mean the same in linen",
        )
    if layer.groups != 1 or any(p != 0 for p in layer.output_padding):
        raise unsupported(
            name,
            "groups/output_padding",
            (layer.groups, layer.output_padding),
            "nn.ConvTranspose has neither",
        )
    params = {"kernel": jnp.moveaxis(layer.weight, (0, 1), (-1, -2))}
    if layer.use_bias:
        params["bias"] = layer.bias.reshape(-1)
    module = nn.ConvTranspose(
        layer.out_channels,
        tuple(layer.kernel_size),
        strides=tuple(layer.stride),
        padding=layer.padding if isinstance(layer.padding, str) else "VALID",
        kernel_dilation=tuple(layer.dilation),
        use_bias=layer.use_bias,
        param_dtype=layer.weight.dtype,
    )
    return module, {"params": params}


register_converter(
    nn.Conv, eqx.nn.Conv, to_native=_conv_to_native, from_native=_conv_from_native
)
register_converter(
    nn.ConvTranspose,
    eqx.nn.ConvTranspose,
    to_native=_conv_transpose_to_native,
    from_native=_conv_transpose_from_native,
)
