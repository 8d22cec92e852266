"""`adapters.LinenBatchNorm`, linen's `nn.BatchNorm` as a native Equinox layer, and
its converters."""

from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp

from .._errors import AdapterError
from ._checks import _check_dtype, _check_entries, _check_reductions, unsupported
from ._registry import _at, register_converter


def _abs_sq(x: jax.Array) -> jax.Array:
    """`|x|²`, as linen computes it."""
    if jnp.iscomplexobj(x):
        return jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x))
    return jnp.square(x)


class LinenBatchNorm(eqx.nn.StatefulLayer):
    """Flax linen's `nn.BatchNorm`, as a native per-example Equinox layer.

    `eqx.nn.BatchNorm` computes something else: its `mode="batch"` debiases the
    running statistics at inference, and its `mode="ema"` normalises training
    batches with blended statistics. This layer computes exactly what linen does:
    in training, normalise with the batch mean and (biased) variance, and update
    `running = momentum * running + (1 - momentum) * batch`; at inference, normalise
    with the running statistics.

    Dtypes follow linen's `nn.BatchNorm` with `dtype=None`: the statistics are
    computed in at least float32 (`jnp.promote_types(x.dtype, jnp.float32)`), and
    the output has the dtype the input, scale and bias promote to.
    `use_fast_variance=True` (linen's default) computes the variance as
    `E[|x|²] - |E[x]|²`, `False` as `E[|x - E[x]|²]`.

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
    use_fast_variance: bool = eqx.field(static=True)
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
        use_fast_variance: bool = True,
    ):
        self.scale = jnp.ones(size, dtype) if use_scale else None
        self.bias = jnp.zeros(size, dtype) if use_bias else None
        # Running statistics in float32 whatever `dtype`, as linen keeps them.
        stats = (jnp.zeros(size, jnp.float32), jnp.ones(size, jnp.float32))
        self.index = eqx.nn.StateIndex(stats)
        self.axis_name = axis_name
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_fast_variance = use_fast_variance
        self.inference = inference

    def _batch_statistics(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """linen's `_compute_stats`, per example, reduced across the vmap axis."""
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        spatial = tuple(range(1, x.ndim))

        def mean(v):
            v = jnp.mean(v, axis=spatial)
            return v if self.axis_name is None else jax.lax.pmean(v, self.axis_name)

        mu = mean(x)
        if self.use_fast_variance:
            var = jnp.maximum(0.0, mean(_abs_sq(x)) - _abs_sq(mu))
        else:
            var = mean(_abs_sq(x - mu.reshape((-1,) + (1,) * len(spatial))))
        return mu, var

    def __call__(self, x, state, *, key=None, inference: bool | None = None):
        inference = self.inference if inference is None else inference
        mean, var = state.get(self.index)
        if not inference:
            batch_mean, batch_var = self._batch_statistics(x)
            m = self.momentum
            # The update keeps the state's dtype (an eqx.nn.State keeps every
            # dtype), also for statistics restored in another dtype.
            state = state.set(
                self.index,
                (
                    (m * mean + (1 - m) * batch_mean).astype(mean.dtype),
                    (m * var + (1 - m) * batch_var).astype(var.dtype),
                ),
            )
            mean, var = batch_mean, batch_var
        # linen's `_normalize`, operation for operation.
        shape = (-1,) + (1,) * (x.ndim - 1)
        y = x - mean.reshape(shape)
        mul = jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
        args = [x]
        if self.scale is not None:
            mul = mul * self.scale.reshape(shape)
            args.append(self.scale)
        y = y * mul
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
            args.append(self.bias)
        dtype = jnp.result_type(*args)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
        return y.astype(dtype), state


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
    _check_dtype(module, name, "adapters.LinenBatchNorm", variables)
    _check_reductions(module, name, "adapters.LinenBatchNorm")
    extra = set(variables) - {"params", "batch_stats"}
    if extra:
        raise AdapterError(
            f"{_at(name)} has variables in {sorted(extra)}, which its converter does "
            "not know: only `params` and `batch_stats` were expected. Pass the "
            "layer's own variables, `{'params': variables['params'], "
            "'batch_stats': variables['batch_stats']}`."
        )
    _check_entries(
        variables,
        name,
        {
            "params": ("scale",) * module.use_scale + ("bias",) * module.use_bias,
            "batch_stats": ("mean", "var"),
        },
        "nn.BatchNorm keeps its running statistics in the `batch_stats` collection: "
        "pass it with `params`, as `module.init(key, x)` or "
        "`module.apply(..., mutable=['batch_stats'])` returns it (for a layer inside "
        "a larger model, the entry under the layer's name in each collection).",
    )
    stats = variables["batch_stats"]
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
        use_fast_variance=module.use_fast_variance,
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
    kwargs = {"param_dtype": next(iter(params.values())).dtype} if params else {}
    module = nn.BatchNorm(
        use_running_average=layer.inference,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        use_scale=layer.scale is not None,
        use_bias=layer.bias is not None,
        use_fast_variance=layer.use_fast_variance,
        **kwargs,
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
