"""Native migration: linen layers converted to real Equinox layers with their
weights, and back, through a public registry of converter pairs."""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import dtypes as linen_dtypes
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

(`convert` converts a sublayer, for layers made of other layers.) Registered {kind}
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


def _qualified(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _find(table: dict[type, Converter], obj: Any, kind: str) -> Converter:
    for cls in type(obj).__mro__:
        if cls in table:
            return table[cls]
    linen = type(obj).__name__ if kind == "linen" else "MyLinenLayer"
    equinox = type(obj).__name__ if kind == "Equinox" else "MyEquinoxLayer"
    # The types of the table searched: linen types for `to_native`, Equinox types
    # for `from_native`.
    registered = ", ".join(sorted(t.__name__ for t in table)) or "none"
    raise AdapterError(
        _UNREGISTERED.format(
            kind=kind,
            name=_qualified(obj),
            linen=linen,
            equinox=equinox,
            registered=registered,
        )
    )


# Where in the layer being converted a sublayer sits (`layers_1` in an
# nn.Sequential, `.layers[1]` in an eqx.nn.Sequential), for error messages.
_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("_PATH", default="")


@contextlib.contextmanager
def _inside(step: str) -> Iterator[None]:
    token = _PATH.set(_PATH.get() + step)
    try:
        yield
    finally:
        _PATH.reset(token)


def _at(layer: str) -> str:
    """`layer`, and where it sits when it is a sublayer."""
    path = _PATH.get().lstrip("/")
    return f"{layer} at `{path}`" if path else layer


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
    input layout. The weights keep their dtype (`param_dtype`).

    `nn.Embed` becomes a real `eqx.nn.Embedding`, with Equinox's indexing: for
    out-of-range indices (outside `[-num_embeddings, num_embeddings)`), linen
    returns rows of NaN and `eqx.nn.Embedding` the nearest row of the table
    (the first or the last), as JAX indexing clamps. In-range indices give
    linen's rows exactly. Check your indices, or keep the layer wrapped with
    [`adapters.ToEquinox`][] if you rely on the NaN rows.

    !!! Example

        ```python
        linear, state = adapters.to_native(nn.Dense(4), variables)
        y = jax.vmap(linear)(x)          # == nn.Dense(4).apply(variables, x)
        ```

    **Returns:**

    `(layer, state)`: `state` is an `eqx.nn.State` for stateful layers, else `None`.
    As with `eqx.nn.make_with_state`, the state's entries are named by their place
    in the layer, so two conversions of the same layer give interchangeable layers
    and states.

    **Raises:**

    [`adapters.AdapterError`][] for an unregistered layer type (with how to
    register one), variables that do not match the layer, or a layer option that
    has no Equinox equivalent, such as a computation `dtype=` other than `None`
    (linen casts to it; Equinox layers compute in the dtype of their weights and
    inputs).
    """
    if not isinstance(module, nn.Module):
        hint = (
            " That is an Equinox layer: `adapters.from_native(layer, state)` "
            "converts it to linen."
            if isinstance(module, eqx.Module)
            else " Pass an unbound linen layer, such as `nn.Dense(4)`, and its "
            "variables."
        )
        raise AdapterTypeError(
            "`adapters.to_native` converts linen layers (`flax.linen.Module`); got "
            f"{_qualified(module)}.{hint}"
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
    # `make_with_state` names each StateIndex by its path in the layer (a bare
    # StateIndex has an anonymous marker, which neither prints nor matches the
    # marker of another conversion of the same layer).
    return eqx.nn.make_with_state(lambda: layer)()


def _to_native(module: nn.Module, variables: dict) -> eqx.Module:
    return _find(_BY_LINEN, module, "linen").to_native(module, variables, _to_native)


def from_native(
    layer: eqx.Module, state: eqx.nn.State | None = None
) -> tuple[nn.Module, dict]:
    """Converts a native Equinox layer (and its state) to a linen layer and its
    variables: the inverse of [`adapters.to_native`][], bit-exact. The linen layer's
    `param_dtype` is the dtype of the weights, so its `init` makes variables like
    these.

    **Returns:**

    `(module, variables)`: an unbound linen module and its variables dict.

    **Raises:**

    [`adapters.AdapterError`][] for an unregistered layer type, or an option with
    no linen equivalent.
    """
    if isinstance(layer, nn.Module):
        raise AdapterTypeError(
            "`adapters.from_native` converts Equinox layers (`equinox.Module`); got "
            f"{_qualified(layer)}. That is a linen layer: "
            "`adapters.to_native(module, variables)` converts it to Equinox."
        )

    def convert(sublayer):
        return _find(_BY_EQUINOX, sublayer, "Equinox").from_native(
            sublayer, state, convert
        )

    return convert(layer)


_WRAP = (
    "Keep this layer wrapped with `adapters.ToEquinox` instead: it runs linen's own "
    "code, so every option works"
)
_KEEP = (
    "Keep this layer as it is, inside linen through `adapters.ToLinen`, instead "
    "of converting it"
)


def _show(option: str, value: Any) -> str:
    if option.endswith(("dtype", "element_type")) and value is not None:
        try:
            return f"jnp.{jnp.dtype(value).name}"
        except (TypeError, ValueError):
            pass
    return repr(value)


def unsupported(
    layer: str, option: str, value: Any, why: str, fix: str | None = None
) -> AdapterError:
    """The error for a layer option that the other library cannot compute: names
    the layer, the option and its value, why, and the fix."""
    if fix is None:
        fix = _WRAP if layer.startswith("nn.") else _KEEP
    other = "native" if layer.startswith("nn.") else "linen"
    return AdapterError(
        f"{_at(layer)} with `{option}={_show(option, value)}` has no {other} "
        f"equivalent: {why}. {fix}."
    )


def skeleton(cls: type, *args: Any, **kwargs: Any) -> eqx.Module:
    """An Equinox layer's structure without computing its initialisation."""
    return eqx.filter_eval_shape(cls, *args, key=jax.random.key(0), **kwargs)


_OWN_VARIABLES = (
    "Pass the layer's own variables, as its `init` returns them (for a layer inside "
    "a larger model, the entry under its name in each collection, e.g. "
    "`{'params': variables['params']['Dense_0']}`), and build the linen layer with "
    "the options the variables were made with (e.g. `use_bias`)."
)


def _check_entries(
    variables: dict,
    layer: str,
    expected: Mapping[str, tuple[str, ...]],
    fix: str = _OWN_VARIABLES,
) -> None:
    """Checks that each collection of `expected` holds exactly the entries (paths
    `a/b`) listed; reports every missing or unexpected one, in one error."""
    problems = []
    for collection, paths in expected.items():
        tree = variables.get(collection) or {}
        have = {"/".join(k) for k in traverse_util.flatten_dict(tree)}
        problems += [f"  {collection}/{p}: missing" for p in sorted(set(paths) - have)]
        problems += [
            f"  {collection}/{p}: unexpected (the layer has no such variable)"
            for p in sorted(have - set(paths))
        ]
    if problems:
        raise AdapterError(
            f"The variables given for {_at(layer)} do not match the layer (got "
            f"collections {sorted(variables)}):\n" + "\n".join(problems) + f"\n{fix}"
        )


def params_of(
    variables: dict, layer: str, expected: tuple[str, ...] | None = None
) -> dict:
    """The layer's `params`, checked: no other collection, and, with `expected`,
    exactly the entries listed."""
    extra = set(variables) - {"params"}
    if extra:
        raise AdapterError(
            f"{_at(layer)} has variables in {sorted(extra)}, which its converter does "
            "not know: only `params` was expected. Pass the `params` collection "
            "only, `{'params': variables['params']}`; if the layer does use these "
            "collections, register a converter for it that converts them "
            "(`adapters.register_converter`)."
        )
    if expected is not None:
        _check_entries(variables, layer, {"params": expected})
    return variables.get("params", {})


def _check_dtype(
    module: nn.Module, name: str, equinox: str, variables: dict | None = None
) -> None:
    """A computation `dtype=` is refused unless it is the dtype of every weight:
    linen casts to it, Equinox layers compute in the dtypes of their weights and
    inputs. Equal to the weights' dtype, linen's cast changes nothing that JAX's
    promotion does not (for inputs no wider than the weights)."""
    if module.dtype is None:
        return
    weights = {
        jnp.dtype(a.dtype)
        for a in jax.tree.leaves((variables or {}).get("params", {}))
        if jnp.issubdtype(a.dtype, jnp.inexact)
    }
    if weights == {jnp.dtype(module.dtype)}:
        return
    got = ", ".join(sorted(map(str, weights))) or "none"
    raise unsupported(
        name,
        "dtype",
        module.dtype,
        "linen casts to `dtype` (its input and parameters, or its output), "
        f"while {equinox} computes in the dtypes of its weights ({got}) and input, "
        "so the two differ",
        "Build the linen layer with `dtype=None` or the weights' dtype (the "
        "variables stay the same; `param_dtype` is kept), or keep it wrapped with "
        "`adapters.ToEquinox`",
    )


def _refuse_set(module: nn.Module, name: str, options: tuple[str, ...], why: str):
    """Refuses each of `options` that is set (not `None`) on `module`."""
    for option in options:
        if getattr(module, option) is not None:
            raise unsupported(name, option, getattr(module, option), why)


def _check_promote(module: nn.Module, name: str) -> None:
    if module.promote_dtype is not linen_dtypes.promote_dtype:
        raise unsupported(
            name,
            "promote_dtype",
            module.promote_dtype,
            "a custom dtype promotion changes what linen computes, and Equinox "
            "layers promote with JAX's rules",
        )


def _check_reductions(module: nn.Module, name: str, equinox: str) -> None:
    if not module.force_float32_reductions:
        raise unsupported(
            name,
            "force_float32_reductions",
            False,
            f"{equinox} computes its statistics in at least float32",
        )


# --- the standard pairs ---------------------------------------------------------


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


def _attention_to_native(
    module: nn.MultiHeadDotProductAttention, variables: dict, convert
) -> eqx.nn.MultiheadAttention:
    name = "nn.MultiHeadDotProductAttention"
    if module.decode:
        raise unsupported(
            name,
            "decode",
            True,
            "eqx.nn.MultiheadAttention has no decode cache",
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
    _refuse_set(
        module,
        name,
        (
            "precision",
            "qkv_dot_general",
            "out_dot_general",
            "qkv_dot_general_cls",
            "out_dot_general_cls",
            "qk_attn_weights_einsum_cls",
            "attn_weights_value_einsum_cls",
        ),
        "eqx.nn.MultiheadAttention uses plain matmuls and einsums",
    )
    _check_dtype(module, name, "eqx.nn.MultiheadAttention", variables)
    if module.force_fp32_for_softmax:
        raise unsupported(
            name,
            "force_fp32_for_softmax",
            True,
            "with half-precision inputs linen then returns float32, while "
            "eqx.nn.MultiheadAttention returns the input's dtype (it always takes "
            "the softmax in at least float32)",
        )
    expected = [f"{p}/kernel" for p in ("query", "key", "value", "out")]
    if module.use_bias:
        expected += [f"{p}/bias" for p in ("query", "key", "value", "out")]
    p = params_of(variables, name, tuple(expected))
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
        param_dtype=layer.query_proj.weight.dtype,
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
