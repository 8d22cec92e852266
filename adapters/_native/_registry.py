"""The converter registry: `register_converter`, and `to_native` / `from_native`,
which dispatch on the layer type through it."""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
from jaxtyping import PyTree

from .._errors import AdapterError, AdapterTypeError
from .._variables import as_collections, strong


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
