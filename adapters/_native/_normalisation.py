"""Converters for `nn.LayerNorm`, `nn.RMSNorm` and `nn.GroupNorm` <-> their
Equinox layers."""

import equinox as eqx
import flax.linen as nn

from .._errors import AdapterError
from ._checks import _check_dtype, _check_reductions, params_of, unsupported
from ._registry import _at, register_converter


def _check_norm(module: nn.Module, name: str, equinox: str, variables: dict) -> None:
    for option in ("reduction_axes", "feature_axes"):
        value = getattr(module, option)
        if value not in (-1, (-1,)):
            raise unsupported(
                name,
                option,
                value,
                "the Equinox layer normalises "
                "over the whole per-example input; convert only "
                "last-axis normalisation, reshaping the input",
            )
    if module.axis_name is not None:
        raise unsupported(
            name,
            "axis_name",
            module.axis_name,
            "the Equinox layer takes no cross-device statistics",
        )
    _check_dtype(module, name, equinox, variables)
    _check_reductions(module, name, equinox)


def _no_size(layer: str, what: str, build: str) -> AdapterError:
    return AdapterError(
        f"{_at(layer)} carries no {what}, which its Equinox layer needs: the "
        f"linen layer learns it from its input only. Build the Equinox layer "
        f"yourself, {build}, or keep the linen layer wrapped with "
        "`adapters.ToEquinox`."
    )


def _layernorm_to_native(module: nn.LayerNorm, variables: dict, convert):
    name = "nn.LayerNorm"
    _check_norm(module, name, "eqx.nn.LayerNorm", variables)
    expected = ("scale",) * module.use_scale + ("bias",) * module.use_bias
    params = params_of(variables, name, expected)
    scale, bias = params.get("scale"), params.get("bias")
    size = scale if scale is not None else bias
    if size is None:
        raise _no_size(
            "nn.LayerNorm with neither scale nor bias",
            "feature size",
            f"`eqx.nn.LayerNorm(features, eps={module.epsilon!r}, use_weight=False, "
            "use_bias=False)` with `features` the size of the input's last axis",
        )
    layer = eqx.nn.LayerNorm(
        size.shape,
        eps=module.epsilon,
        use_weight=module.use_scale,
        use_bias=module.use_bias,
        dtype=size.dtype,
    )
    if module.use_scale:
        layer = eqx.tree_at(lambda m: m.weight, layer, scale)
    if module.use_bias:
        layer = eqx.tree_at(lambda m: m.bias, layer, bias)
    return layer


def _layernorm_from_native(layer: eqx.nn.LayerNorm, state, convert):
    if len(layer.shape) != 1:
        raise unsupported(
            "eqx.nn.LayerNorm",
            "shape",
            layer.shape,
            "nn.LayerNorm with the default axes normalises the last axis only",
        )
    params = {}
    if layer.use_weight:
        params["scale"] = layer.weight
    if layer.use_bias:
        params["bias"] = layer.bias
    kwargs = {"param_dtype": next(iter(params.values())).dtype} if params else {}
    module = nn.LayerNorm(
        epsilon=layer.eps,
        use_scale=layer.use_weight,
        use_bias=layer.use_bias,
        **kwargs,
    )
    return module, {"params": params} if params else {}


def _rmsnorm_to_native(module: nn.RMSNorm, variables: dict, convert):
    name = "nn.RMSNorm"
    _check_norm(module, name, "eqx.nn.RMSNorm", variables)
    params = params_of(variables, name, ("scale",) if module.use_scale else ())
    if not module.use_scale:
        raise _no_size(
            "nn.RMSNorm(use_scale=False)",
            "feature size",
            f"`eqx.nn.RMSNorm(features, eps={module.epsilon!r}, use_weight=False, "
            "use_bias=False)` with `features` the size of the input's last axis",
        )
    scale = params["scale"]
    layer = eqx.nn.RMSNorm(
        scale.shape,
        eps=module.epsilon,
        use_weight=True,
        use_bias=False,
        dtype=scale.dtype,
    )
    return eqx.tree_at(lambda m: m.weight, layer, scale)


def _rmsnorm_from_native(layer: eqx.nn.RMSNorm, state, convert):
    if layer.use_bias or not layer.use_weight or len(layer.shape) != 1:
        raise unsupported(
            "eqx.nn.RMSNorm",
            "use_bias/use_weight/shape",
            (layer.use_bias, layer.use_weight, layer.shape),
            "nn.RMSNorm has a last-axis scale and no bias",
        )
    module = nn.RMSNorm(epsilon=layer.eps, param_dtype=layer.weight.dtype)
    return module, {"params": {"scale": layer.weight}}


def _groupnorm_to_native(module: nn.GroupNorm, variables: dict, convert):
    name = "nn.GroupNorm"
    if module.reduction_axes is not None:
        raise unsupported(
            name,
            "reduction_axes",
            module.reduction_axes,
            "eqx.nn.GroupNorm normalises each whole example",
        )
    if module.axis_name is not None:
        raise unsupported(
            name,
            "axis_name",
            module.axis_name,
            "eqx.nn.GroupNorm takes no cross-device statistics",
        )
    if module.use_scale != module.use_bias:
        raise unsupported(
            name,
            "use_scale/use_bias",
            (module.use_scale, module.use_bias),
            "eqx.nn.GroupNorm has both affine parameters or neither",
        )
    _check_dtype(module, name, "eqx.nn.GroupNorm", variables)
    _check_reductions(module, name, "eqx.nn.GroupNorm")
    params = params_of(variables, name, ("scale", "bias") if module.use_scale else ())
    if not module.use_scale:
        groups = (
            f"channels // {module.group_size}"
            if module.num_groups is None
            else repr(module.num_groups)
        )
        raise _no_size(
            "nn.GroupNorm without scale and bias",
            "channel count",
            f"`eqx.nn.GroupNorm({groups}, channels, eps={module.epsilon!r}, "
            "channelwise_affine=False)` with `channels` the size of the input's "
            "channel axis",
        )
    scale, bias = params["scale"], params["bias"]
    channels = scale.shape[0]
    groups = module.num_groups or channels // module.group_size
    layer = eqx.nn.GroupNorm(groups, channels, eps=module.epsilon, dtype=scale.dtype)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (scale, bias))


def _groupnorm_from_native(layer: eqx.nn.GroupNorm, state, convert):
    kwargs = {"param_dtype": layer.weight.dtype} if layer.channelwise_affine else {}
    module = nn.GroupNorm(
        num_groups=layer.groups,
        epsilon=layer.eps,
        use_scale=layer.channelwise_affine,
        use_bias=layer.channelwise_affine,
        **kwargs,
    )
    if not layer.channelwise_affine:
        return module, {}
    return module, {"params": {"scale": layer.weight, "bias": layer.bias}}


register_converter(
    nn.LayerNorm,
    eqx.nn.LayerNorm,
    to_native=_layernorm_to_native,
    from_native=_layernorm_from_native,
)
register_converter(
    nn.RMSNorm,
    eqx.nn.RMSNorm,
    to_native=_rmsnorm_to_native,
    from_native=_rmsnorm_from_native,
)
register_converter(
    nn.GroupNorm,
    eqx.nn.GroupNorm,
    to_native=_groupnorm_to_native,
    from_native=_groupnorm_from_native,
)
