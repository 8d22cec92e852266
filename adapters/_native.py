"""Native migration: linen layers converted to real Equinox layers with their
weights, and back, through a public registry of converter pairs."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._errors import AdapterError, AdapterTypeError
from ._variables import as_collections, strong


ToNative = Callable[[nn.Module, dict, Callable], eqx.Module]
FromNative = Callable[[eqx.Module, eqx.nn.State | None, Callable], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Converter:
    """A registered pair: how a linen layer type becomes an Equinox layer type, and
    back."""

    linen_type: type
    equinox_type: type
    to_native: ToNative
    from_native: FromNative


_BY_LINEN: dict[type, Converter] = {}
_BY_EQUINOX: dict[type, Converter] = {}

_UNREGISTERED = """\
No converter is registered for {kind} layer type {name}. Register one for your own
layer types:

    adapters.register_converter(
        {linen}, {equinox},
        to_native=lambda module, variables, convert: ...,  # an Equinox layer
        from_native=lambda layer, state, convert: ...,  # (linen module, variables)
    )

(`convert` converts a sublayer, for layers made of other layers.) Registered linen
types: {registered}.\
"""


def register_converter(
    linen_type: type,
    equinox_type: type,
    *,
    to_native: ToNative | None = None,
    from_native: FromNative | None = None,
) -> Any:
    """Registers how a linen layer type converts to an Equinox layer type, and back.

    Call it with both functions, or use it as a class decorator on a class that
    defines them as static methods:

    !!! Example

        ```python
        @adapters.register_converter(Mixer, EqxMixer)
        class MixerConverter:
            @staticmethod
            def to_native(module, variables, convert): ...

            @staticmethod
            def from_native(layer, state, convert): ...
        ```

    **Arguments:**

    - `linen_type`, `equinox_type`: the two layer classes (subclasses match too).
    - `to_native`: `(module, variables, convert) -> equinox_layer`. `variables` is
        the layer's own linen variables dict; `convert(submodule, subvariables)`
        converts a sublayer. A stateful layer holds its initial state in an
        `eqx.nn.StateIndex`, which [`adapters.to_native`][] collects.
    - `from_native`: `(layer, state, convert) -> (linen_module, variables)`;
        `convert(sublayer)` converts a sublayer back.

    A later registration for the same types replaces the earlier one.

    **Returns:**

    `None`, or, without the two functions, the class decorator.
    """
    if to_native is None and from_native is None:

        def decorator(cls):
            register_converter(
                linen_type,
                equinox_type,
                to_native=cls.to_native,
                from_native=cls.from_native,
            )
            return cls

        return decorator
    if to_native is None or from_native is None:
        raise AdapterTypeError(
            "`adapters.register_converter` takes both `to_native=` and "
            "`from_native=`, or neither (as a class decorator)."
        )
    converter = Converter(linen_type, equinox_type, to_native, from_native)
    _BY_LINEN[linen_type] = converter
    _BY_EQUINOX[equinox_type] = converter


def _find(table: dict[type, Converter], obj: Any, kind: str) -> Converter:
    for cls in type(obj).__mro__:
        if cls in table:
            return table[cls]
    linen = type(obj).__name__ if kind == "linen" else "MyLinenLayer"
    equinox = type(obj).__name__ if kind == "Equinox" else "MyEquinoxLayer"
    registered = ", ".join(sorted(t.__name__ for t in _BY_LINEN)) or "none"
    raise AdapterError(
        _UNREGISTERED.format(
            kind=kind,
            name=f"{type(obj).__module__}.{type(obj).__qualname__}",
            linen=linen,
            equinox=equinox,
            registered=registered,
        )
    )


def to_native(
    module: nn.Module, variables: PyTree
) -> tuple[eqx.Module, eqx.nn.State | None]:
    """Converts a linen layer (and its variables) to a native Equinox layer holding
    the same weights.

    Dispatches on the layer type through the registry
    ([`adapters.register_converter`][]), recursively for layers made of layers
    (`nn.Sequential` of registered layers becomes `eqx.nn.Sequential`). The result
    is a plain Equinox module: no linen at run time. Equinox layers are per example
    (and channels-first for convolutions): see the migration guide for each pair's
    input layout.

    !!! Example

        ```python
        linear, state = adapters.to_native(nn.Dense(4), variables)
        y = jax.vmap(linear)(x)          # == nn.Dense(4).apply(variables, x)
        ```

    **Returns:**

    `(layer, state)`: `state` is an `eqx.nn.State` for stateful layers, else `None`.

    **Raises:**

    [`adapters.AdapterError`][] for an unregistered layer type (with how to
    register one), or a layer option that has no Equinox equivalent.
    """
    if not isinstance(module, nn.Module):
        raise AdapterTypeError(
            f"`adapters.to_native` converts linen layers; got {type(module).__name__}."
        )
    layer = _to_native(module, as_collections(variables, "`variables`"))
    # Arrays made from Python scalars are weakly typed; state updates are not.
    layer = strong(layer, scalars=False)
    stateful = any(
        isinstance(x, eqx.nn.StateIndex)
        for x in jax.tree.leaves(
            layer, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
        )
    )
    if not stateful:
        return layer, None
    return eqx.nn.delete_init_state(layer), eqx.nn.State(layer)


def _to_native(module: nn.Module, variables: dict) -> eqx.Module:
    return _find(_BY_LINEN, module, "linen").to_native(module, variables, _to_native)


def from_native(
    layer: eqx.Module, state: eqx.nn.State | None = None
) -> tuple[nn.Module, dict]:
    """Converts a native Equinox layer (and its state) to a linen layer and its
    variables: the inverse of [`adapters.to_native`][], bit-exact.

    **Returns:**

    `(module, variables)`: an unbound linen module and its variables dict.

    **Raises:**

    [`adapters.AdapterError`][] for an unregistered layer type, or an option with
    no linen equivalent.
    """

    def convert(sublayer):
        return _find(_BY_EQUINOX, sublayer, "Equinox").from_native(
            sublayer, state, convert
        )

    return convert(layer)


def unsupported(layer: str, option: str, value: Any, why: str) -> AdapterError:
    return AdapterError(
        f"{layer} with `{option}={value!r}` has no native equivalent: {why}."
    )


def skeleton(cls: type, *args: Any, **kwargs: Any) -> eqx.Module:
    """An Equinox layer's structure without computing its initialisation."""
    return eqx.filter_eval_shape(cls, *args, key=jax.random.key(0), **kwargs)


def params_of(variables: dict, layer: str) -> dict:
    extra = set(variables) - {"params"}
    if extra:
        raise AdapterError(
            f"{layer} has variables in {sorted(extra)}, which its converter does not "
            "know: only `params` was expected."
        )
    return variables.get("params", {})


# --- the standard pairs ---------------------------------------------------------


def _dense_to_native(module: nn.Dense, variables: dict, convert) -> eqx.nn.Linear:
    if module.precision is not None:
        raise unsupported(
            "nn.Dense",
            "precision",
            module.precision,
            "eqx.nn.Linear has no precision option",
        )
    if module.dot_general is not None or module.dot_general_cls is not None:
        raise unsupported(
            "nn.Dense",
            "dot_general",
            module.dot_general,
            "eqx.nn.Linear always uses a plain matmul",
        )
    params = params_of(variables, "nn.Dense")
    kernel = params["kernel"]
    layer = skeleton(
        eqx.nn.Linear,
        kernel.shape[0],
        kernel.shape[1],
        use_bias=module.use_bias,
        dtype=kernel.dtype,
    )
    new = (kernel.T, params["bias"]) if module.use_bias else (kernel.T,)
    where = (
        (lambda m: (m.weight, m.bias)) if module.use_bias else (lambda m: (m.weight,))
    )
    return eqx.tree_at(where, layer, new)


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
    return nn.Dense(layer.out_features, use_bias=layer.use_bias), {"params": params}


def _embed_to_native(module: nn.Embed, variables: dict, convert) -> eqx.nn.Embedding:
    table = params_of(variables, "nn.Embed")["embedding"]
    return eqx.nn.Embedding(weight=table)


def _embedding_from_native(layer: eqx.nn.Embedding, state, convert):
    num, features = layer.weight.shape
    return nn.Embed(num, features), {"params": {"embedding": layer.weight}}


def _check_last_axis(module: nn.Module, name: str, *options: str) -> None:
    for option in options:
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
    if getattr(module, "axis_name", None) is not None:
        raise unsupported(
            name,
            "axis_name",
            module.axis_name,
            "the Equinox layer takes no cross-device statistics",
        )


def _layernorm_to_native(module: nn.LayerNorm, variables: dict, convert):
    _check_last_axis(module, "nn.LayerNorm", "reduction_axes", "feature_axes")
    params = params_of(variables, "nn.LayerNorm")
    scale, bias = params.get("scale"), params.get("bias")
    size = scale if scale is not None else bias
    if size is None:
        raise AdapterError(
            "nn.LayerNorm with neither scale nor bias carries no feature size; give "
            "it `use_scale=True` or build `eqx.nn.LayerNorm(shape, use_weight=False, "
            "use_bias=False)` yourself."
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
    module = nn.LayerNorm(
        epsilon=layer.eps, use_scale=layer.use_weight, use_bias=layer.use_bias
    )
    return module, {"params": params} if params else {}


def _rmsnorm_to_native(module: nn.RMSNorm, variables: dict, convert):
    _check_last_axis(module, "nn.RMSNorm", "reduction_axes", "feature_axes")
    scale = params_of(variables, "nn.RMSNorm").get("scale")
    if scale is None:
        raise AdapterError(
            "nn.RMSNorm(use_scale=False) carries no feature size; build "
            "`eqx.nn.RMSNorm(shape, use_weight=False)` yourself."
        )
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
    return nn.RMSNorm(epsilon=layer.eps), {"params": {"scale": layer.weight}}


def _dropout_to_native(module: nn.Dropout, variables: dict, convert):
    if module.broadcast_dims:
        raise unsupported(
            "nn.Dropout",
            "broadcast_dims",
            module.broadcast_dims,
            "eqx.nn.Dropout drops every element independently",
        )
    return eqx.nn.Dropout(module.rate, inference=bool(module.deterministic))


def _dropout_from_native(layer: eqx.nn.Dropout, state, convert):
    return nn.Dropout(layer.p, deterministic=bool(layer.inference)), {}


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
    for option in ("mask", "precision", "conv_general_dilated"):
        if getattr(module, option) is not None:
            raise unsupported(
                name, option, getattr(module, option), "eqx.nn.Conv has no such option"
            )
    params = params_of(variables, name)
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
    )
    return module, {"params": params}


def _sequential_to_native(module: nn.Sequential, variables: dict, convert):
    layers = []
    for i, sub in enumerate(module.layers):
        if isinstance(sub, nn.Module):
            name = sub.name or f"layers_{i}"
            sub_vars = {c: v[name] for c, v in variables.items() if name in v}
            layers.append(convert(sub.clone(parent=None, name=None), sub_vars))
        elif callable(sub):
            layers.append(eqx.nn.Lambda(sub))
        else:
            raise AdapterTypeError(f"nn.Sequential layer {i} is not callable: {sub!r}")
    return eqx.nn.Sequential(layers)


def _sequential_from_native(layer: eqx.nn.Sequential, state, convert):
    modules, variables = [], {}
    for i, sub in enumerate(layer.layers):
        if isinstance(sub, eqx.nn.Lambda):
            modules.append(sub.fn)
            continue
        module, sub_vars = convert(sub)
        modules.append(module)
        for collection, tree in sub_vars.items():
            variables.setdefault(collection, {})[f"layers_{i}"] = tree
    return nn.Sequential(modules), variables


register_converter(
    nn.Dense, eqx.nn.Linear, to_native=_dense_to_native, from_native=_linear_from_native
)
register_converter(
    nn.Embed,
    eqx.nn.Embedding,
    to_native=_embed_to_native,
    from_native=_embedding_from_native,
)
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
    nn.Dropout,
    eqx.nn.Dropout,
    to_native=_dropout_to_native,
    from_native=_dropout_from_native,
)
register_converter(
    nn.Conv, eqx.nn.Conv, to_native=_conv_to_native, from_native=_conv_from_native
)
register_converter(
    nn.Sequential,
    eqx.nn.Sequential,
    to_native=_sequential_to_native,
    from_native=_sequential_from_native,
)


class LinenBatchNorm(eqx.nn.StatefulLayer):
    """Flax linen's `nn.BatchNorm`, as a native per-example Equinox layer.

    `eqx.nn.BatchNorm` computes something else: its `mode="batch"` debiases the
    running statistics at inference, and its `mode="ema"` normalises training
    batches with blended statistics. This layer computes exactly what linen does:
    in training, normalise with the batch mean and (biased) variance, and update
    `running = momentum * running + (1 - momentum) * batch`; at inference, normalise
    with the running statistics.

    Like `eqx.nn.BatchNorm` it is per example, channels-first (`(channels, *spatial)`),
    and takes its batch statistics across a `jax.vmap` axis:

    ```python
    out, state = jax.vmap(
        layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    ```
    """

    scale: jax.Array | None
    bias: jax.Array | None
    index: eqx.nn.StateIndex
    axis_name: Any = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        size: int,
        axis_name: Any = "batch",
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        inference: bool = False,
        dtype: Any = jnp.float32,
    ):
        self.scale = jnp.ones(size, dtype) if use_scale else None
        self.bias = jnp.zeros(size, dtype) if use_bias else None
        self.index = eqx.nn.StateIndex((jnp.zeros(size, dtype), jnp.ones(size, dtype)))
        self.axis_name = axis_name
        self.momentum = momentum
        self.epsilon = epsilon
        self.inference = inference

    def __call__(self, x, state, *, key=None, inference: bool | None = None):
        inference = self.inference if inference is None else inference
        mean, var = state.get(self.index)
        spatial = tuple(range(1, x.ndim))
        if not inference:
            batch_mean = jnp.mean(x, axis=spatial)
            batch_square = jnp.mean(jnp.square(x), axis=spatial)
            if self.axis_name is not None:
                batch_mean = jax.lax.pmean(batch_mean, self.axis_name)
                batch_square = jax.lax.pmean(batch_square, self.axis_name)
            batch_var = jnp.maximum(0.0, batch_square - jnp.square(batch_mean))
            m = self.momentum
            state = state.set(
                self.index,
                (m * mean + (1 - m) * batch_mean, m * var + (1 - m) * batch_var),
            )
            mean, var = batch_mean, batch_var
        shape = (-1,) + (1,) * (x.ndim - 1)
        y = (x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
        if self.scale is not None:
            y = y * self.scale.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y, state


def _batchnorm_to_native(module: nn.BatchNorm, variables: dict, convert):
    name = "nn.BatchNorm"
    if module.axis not in (-1,):
        raise unsupported(
            name,
            "axis",
            module.axis,
            "the native layer normalises the channel axis, which linen has last",
        )
    if module.axis_index_groups is not None:
        raise unsupported(
            name,
            "axis_index_groups",
            module.axis_index_groups,
            "the native layer reduces across the whole vmapped axis",
        )
    stats = variables.get("batch_stats", {})
    params = variables.get("params", {})
    mean, var = stats["mean"], stats["var"]
    layer = LinenBatchNorm(
        mean.shape[0],
        axis_name=module.axis_name or "batch",
        momentum=module.momentum,
        epsilon=module.epsilon,
        use_scale=module.use_scale,
        use_bias=module.use_bias,
        inference=bool(module.use_running_average),
        dtype=mean.dtype,
    )
    return eqx.tree_at(
        lambda m: (m.scale, m.bias, m.index.init),
        layer,
        (params.get("scale"), params.get("bias"), (mean, var)),
        is_leaf=lambda x: x is None,
    )


def _batchnorm_from_native(layer: LinenBatchNorm, state, convert):
    if state is None:
        raise AdapterError(
            "`adapters.from_native` needs the `eqx.nn.State` of a LinenBatchNorm "
            "(its running statistics): `from_native(layer, state)`."
        )
    mean, var = state.get(layer.index)
    params = {}
    if layer.scale is not None:
        params["scale"] = layer.scale
    if layer.bias is not None:
        params["bias"] = layer.bias
    module = nn.BatchNorm(
        use_running_average=layer.inference,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        use_scale=layer.scale is not None,
        use_bias=layer.bias is not None,
    )
    variables = {"batch_stats": {"mean": mean, "var": var}}
    if params:
        variables = {"params": params, **variables}
    return module, variables


register_converter(
    nn.BatchNorm,
    LinenBatchNorm,
    to_native=_batchnorm_to_native,
    from_native=_batchnorm_from_native,
)


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
    params = params_of(variables, name)
    if not params:
        raise AdapterError(
            "nn.GroupNorm without scale and bias carries no channel count; build "
            "`eqx.nn.GroupNorm(groups, channels, channelwise_affine=False)` yourself."
        )
    scale, bias = params["scale"], params["bias"]
    channels = scale.shape[0]
    groups = module.num_groups or channels // module.group_size
    layer = eqx.nn.GroupNorm(groups, channels, eps=module.epsilon, dtype=scale.dtype)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (scale, bias))


def _groupnorm_from_native(layer: eqx.nn.GroupNorm, state, convert):
    module = nn.GroupNorm(
        num_groups=layer.groups,
        epsilon=layer.eps,
        use_scale=layer.channelwise_affine,
        use_bias=layer.channelwise_affine,
    )
    if not layer.channelwise_affine:
        return module, {}
    return module, {"params": {"scale": layer.weight, "bias": layer.bias}}


register_converter(
    nn.GroupNorm,
    eqx.nn.GroupNorm,
    to_native=_groupnorm_to_native,
    from_native=_groupnorm_from_native,
)


def _check_gates(module: nn.Module, name: str) -> None:
    if module.gate_fn is not nn.sigmoid or module.activation_fn is not nn.tanh:
        raise unsupported(
            name,
            "gate_fn/activation_fn",
            (module.gate_fn, module.activation_fn),
            "the Equinox cell uses sigmoid gates and tanh",
        )


def _gru_to_native(module: nn.GRUCell, variables: dict, convert) -> eqx.nn.GRUCell:
    _check_gates(module, "nn.GRUCell")
    p = params_of(variables, "nn.GRUCell")
    inputs, hidden = p["ir"]["kernel"].shape
    cell = skeleton(eqx.nn.GRUCell, inputs, hidden, dtype=p["ir"]["kernel"].dtype)
    gates = ("r", "z", "n")
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
    return nn.GRUCell(cell.hidden_size), {"params": params}


def _lstm_to_native(module: nn.LSTMCell, variables: dict, convert) -> eqx.nn.LSTMCell:
    _check_gates(module, "nn.LSTMCell")
    p = params_of(variables, "nn.LSTMCell")
    inputs, hidden = p["ii"]["kernel"].shape
    cell = skeleton(eqx.nn.LSTMCell, inputs, hidden, dtype=p["ii"]["kernel"].dtype)
    gates = ("i", "f", "g", "o")
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
    return nn.LSTMCell(cell.hidden_size), {"params": params}


register_converter(
    nn.GRUCell, eqx.nn.GRUCell, to_native=_gru_to_native, from_native=_gru_from_native
)
register_converter(
    nn.LSTMCell,
    eqx.nn.LSTMCell,
    to_native=_lstm_to_native,
    from_native=_lstm_from_native,
)


def _attention_to_native(
    module: nn.MultiHeadDotProductAttention, variables: dict, convert
) -> eqx.nn.MultiheadAttention:
    name = "nn.MultiHeadDotProductAttention"
    if module.decode:
        raise unsupported(
            name,
            "decode",
            True,
            "eqx.nn.MultiheadAttention has no "
            "decode cache; wrap the layer with adapters.ToEquinox",
        )
    if module.normalize_qk:
        raise unsupported(
            name,
            "normalize_qk",
            True,
            "eqx.nn.MultiheadAttention has no query/key normalisation",
        )
    if module.attention_fn is not nn.dot_product_attention:
        raise unsupported(
            name,
            "attention_fn",
            module.attention_fn,
            "eqx.nn.MultiheadAttention computes dot-product attention",
        )
    if module.dropout_rate and module.broadcast_dropout:
        raise unsupported(
            name,
            "broadcast_dropout",
            True,
            "eqx.nn.MultiheadAttention drops each weight independently",
        )
    p = params_of(variables, name)
    q, k, v, out = p["query"], p["key"], p["value"], p["out"]
    heads, qk_size = q["kernel"].shape[1:]
    vo_size = v["kernel"].shape[2]
    layer = skeleton(
        eqx.nn.MultiheadAttention,
        heads,
        q["kernel"].shape[0],
        k["kernel"].shape[0],
        v["kernel"].shape[0],
        out["kernel"].shape[2],
        qk_size=qk_size,
        vo_size=vo_size,
        use_query_bias=module.use_bias,
        use_key_bias=module.use_bias,
        use_value_bias=module.use_bias,
        use_output_bias=module.use_bias,
        dropout_p=module.dropout_rate,
        inference=bool(module.deterministic),
        dtype=q["kernel"].dtype,
    )

    def flat(kernel):  # (in, heads, size) -> (heads * size, in)
        return kernel.reshape(kernel.shape[0], -1).T

    weights = [
        flat(q["kernel"]),
        flat(k["kernel"]),
        flat(v["kernel"]),
        out["kernel"].reshape(-1, out["kernel"].shape[-1]).T,
    ]
    projections = lambda m: [  # noqa: E731
        m.query_proj,
        m.key_proj,
        m.value_proj,
        m.output_proj,
    ]
    layer = eqx.tree_at(lambda m: [p.weight for p in projections(m)], layer, weights)
    if module.use_bias:
        biases = [
            q["bias"].reshape(-1),
            k["bias"].reshape(-1),
            v["bias"].reshape(-1),
            out["bias"],
        ]
        layer = eqx.tree_at(lambda m: [p.bias for p in projections(m)], layer, biases)
    return layer


def _attention_from_native(layer: eqx.nn.MultiheadAttention, state, convert):
    biases = (
        layer.use_query_bias,
        layer.use_key_bias,
        layer.use_value_bias,
        layer.use_output_bias,
    )
    if len(set(biases)) != 1:
        raise unsupported(
            "eqx.nn.MultiheadAttention",
            "use_*_bias",
            biases,
            "nn.MultiHeadDotProductAttention has one `use_bias` for all",
        )
    heads = layer.num_heads

    def unflat(weight):  # (heads * size, in) -> (in, heads, size)
        return weight.T.reshape(weight.shape[1], heads, -1)

    params = {
        "query": {"kernel": unflat(layer.query_proj.weight)},
        "key": {"kernel": unflat(layer.key_proj.weight)},
        "value": {"kernel": unflat(layer.value_proj.weight)},
        "out": {
            "kernel": layer.output_proj.weight.T.reshape(heads, -1, layer.output_size)
        },
    }
    if biases[0]:
        for name, proj in (
            ("query", layer.query_proj),
            ("key", layer.key_proj),
            ("value", layer.value_proj),
        ):
            params[name]["bias"] = proj.bias.reshape(heads, -1)
        params["out"]["bias"] = layer.output_proj.bias
    if layer.qk_size != layer.vo_size:
        raise unsupported(
            "eqx.nn.MultiheadAttention",
            "qk_size != vo_size",
            (layer.qk_size, layer.vo_size),
            "linen uses one `qkv_features` for queries, keys and values",
        )
    module = nn.MultiHeadDotProductAttention(
        num_heads=heads,
        qkv_features=heads * layer.qk_size,
        out_features=layer.output_size,
        use_bias=biases[0],
        dropout_rate=layer.dropout.p,
        deterministic=bool(layer.dropout.inference),
        broadcast_dropout=False,
    )
    return module, {"params": params}


register_converter(
    nn.MultiHeadDotProductAttention,
    eqx.nn.MultiheadAttention,
    to_native=_attention_to_native,
    from_native=_attention_from_native,
)


def _conv_transpose_to_native(module: nn.ConvTranspose, variables: dict, convert):
    name = "nn.ConvTranspose"
    for option in ("mask", "precision"):
        if getattr(module, option) is not None:
            raise unsupported(
                name,
                option,
                getattr(module, option),
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
    params = params_of(variables, name)
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
    params = params_of(variables, name)
    kernel = params["kernel"].reshape(-1, features)
    dense = {"kernel": kernel}
    if module.use_bias:
        dense["bias"] = params["bias"].reshape(features)
    return _dense_to_native(
        nn.Dense(features, use_bias=module.use_bias, precision=module.precision),
        {"params": dense},
        convert,
    )


register_converter(
    nn.ConvTranspose,
    eqx.nn.ConvTranspose,
    to_native=_conv_transpose_to_native,
    from_native=_conv_transpose_from_native,
)
# DenseGeneral converts one way only: its Equinox form is an eqx.nn.Linear, which
# converts back to nn.Dense (the same computation).
_BY_LINEN[nn.DenseGeneral] = Converter(
    nn.DenseGeneral, eqx.nn.Linear, _dense_general_to_native, _linear_from_native
)
