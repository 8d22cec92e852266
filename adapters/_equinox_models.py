"""An Equinox model and its state as the wrappers of Equinox models take them
(`ToLinen`, `EquinoxToNNX`): the state checked against the model, and the model
called on one example or mapped over a batch axis."""

import re
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from ._errors import AdapterError, AdapterTypeError
from ._variables import (
    equinox_to_variables,
    insert_at,
    is_arraylike,
    is_state_index,
    path_keys,
    spec_problems,
    TreeSpec,
)


_PER_EXAMPLE_STATE = """\
With `vmap_axis={axis}`, the Equinox model is mapped over the batch axis with its
state unmapped, but the model computed a different state update for each example.
Give the model's stateful layers the `axis_name` that `{wrapper}` maps over (e.g.
`eqx.nn.BatchNorm(..., axis_name={axis_name!r})` with `{wrapper}(...,
axis_name={axis_name!r})`), so that they reduce across the batch.\
"""

_UNBOUND_AXIS = """\
The Equinox model reduces over axis name {name!r} (e.g. an `eqx.nn.BatchNorm(...,
axis_name={name!r})`), but this `{wrapper}` does not map over an axis of that name
(`vmap_axis={axis}`, `axis_name={axis_name!r}`). Name the batch axis as the
model's layers do: `{wrapper}(..., vmap_axis=0, axis_name={name!r})`, or
`{shortcut}(model, state, vmap_axis=0, axis_name={name!r})`.\
"""

_WHOLE_BATCH = """\
This `{wrapper}` has no `vmap_axis`, so it called the Equinox model on the whole
batch, and the model failed:
  {error}
Equinox models act on one example (an `eqx.nn.Linear` takes a vector), and this
model runs mapped over axis 0 of the inputs. Pass the batch axis{reduces}:
`{shortcut}(model, state, vmap_axis=0{axis_name})`, or
`{wrapper}(..., vmap_axis=0{axis_name})`.\
"""

_NO_ARGS = """\
`{wrapper}(vmap_axis=...)` maps the model over the batch axis of its positional
inputs, but the call has none.\
"""

_NOT_A_STATE = """\
The Equinox model was called with its state, so it must return `(out, state)`, as
Equinox's stateful layers do, but it returned {got}. Return the state, updated or
not: `return out, state`.\
"""


_STATE_DOES_NOT_FIT = """\
{where}: the `eqx.nn.State` does not fit the Equinox model; each entry
must have the tree structure, shape and dtype of the initial value of its
`eqx.nn.StateIndex`:
{problems}
The state was probably made for another model (or edited by hand). Pass the state
made together with this model by `eqx.nn.make_with_state`: `model, state =
eqx.nn.make_with_state(Model)(...)`.\
"""

# What `eqx.nn.delete_init_state` (and so `make_with_state`) leaves in place of a
# `StateIndex`'s initial value. Compared by type: a pytree round trip (e.g.
# `eqx.filter_eval_shape`) rebuilds the sentinel, so identity is not kept.
_DELETED_INIT = type(eqx.nn.delete_init_state(eqx.nn.StateIndex(0)).init)


def _holds_init(x: Any) -> bool:
    return is_state_index(x) and not isinstance(x.init, _DELETED_INIT)


# Equinox's own stateful layers whose state's shapes follow from their fields. For
# these, an index whose initial value was deleted (`eqx.nn.make_with_state` does) gets
# it back, abstractly: the layer's own constructor runs under
# `eqx.filter_eval_shape` with the given layer's fields (no array is allocated).
# Exact types only: a subclass may build its state otherwise. A user's own layer
# records nothing of its state once its initial value is deleted, so there only
# the entry's presence is checked (and a mis-shaped entry fails inside the
# computation, with JAX's shape error or Equinox's `State.set` error).
_BATCH_NORM_INDICES = (
    "ema_first_time_index",
    "ema_state_index",
    "batch_counter",
    "batch_state_index",
)


def _batch_norm_inits(layer: eqx.nn.BatchNorm) -> dict[Any, PyTree]:
    # The state's float dtype is the constructor's `dtype=` (there the weight's);
    # with `channelwise_affine=False` there is no weight and the default is taken.
    # Either way it is only displayed: see `_loosen`.
    weight = layer.weight
    dtype = None if weight is None else weight.dtype
    built = eqx.filter_eval_shape(
        lambda: eqx.nn.BatchNorm(
            layer.input_size,
            layer.axis_name,
            eps=layer.eps,
            channelwise_affine=layer.channelwise_affine,
            momentum=layer.momentum,
            inference=layer.inference,
            dtype=dtype,
            mode=layer.mode,
        )
    )
    inits = {}
    for name in _BATCH_NORM_INDICES:
        index, derived = getattr(layer, name), getattr(built, name)
        if is_state_index(index) and is_state_index(derived):
            inits[index.marker] = derived.init
    return inits


def _spectral_norm_inits(layer: eqx.nn.SpectralNorm) -> dict[Any, PyTree]:
    # `u` and `v` take the dtype of the wrapped weight at construction.
    def build(inner):
        return eqx.nn.SpectralNorm(
            inner,
            layer.weight_name,
            num_power_iterations=layer.num_power_iterations,
            eps=layer.eps,
            inference=layer.inference,
            key=jax.random.key(0),  # traced only: the values are never computed
        )

    built = eqx.filter_eval_shape(build, layer.layer)
    return {layer.uv_index.marker: built.uv_index.init}


_DERIVE = {
    eqx.nn.BatchNorm: _batch_norm_inits,
    eqx.nn.SpectralNorm: _spectral_norm_inits,
}


def _derived_inits(tree: PyTree) -> dict[Any, PyTree]:
    """The abstract initial value, by marker, of every deleted-init `StateIndex` of
    an Equinox `BatchNorm` or `SpectralNorm` in `tree` (also nested: inside
    `eqx.nn.Sequential`, a user's module, or the layer a `SpectralNorm` wraps)."""
    inits: dict[Any, PyTree] = {}
    layers = jtu.tree_leaves(tree, is_leaf=lambda x: type(x) in _DERIVE)
    for layer in layers:
        if type(layer) not in _DERIVE:
            continue
        if type(layer) is eqx.nn.SpectralNorm:
            inits.update(_derived_inits(layer.layer))
        indices = jtu.tree_leaves(layer, is_leaf=is_state_index)
        if all(_holds_init(x) for x in indices if is_state_index(x)):
            continue  # nothing deleted: the held initial values are compared
        try:
            derived = _DERIVE[type(layer)](layer)
        except Exception:  # fields the constructor refuses: leave it unchecked
            continue  # rather than refuse a state that may well run
        inits.update(derived)
    return inits


def _inexact(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _loosen(expected: PyTree, given: PyTree) -> PyTree:
    """A derived initial value, with each floating leaf taking the dtype of the
    given entry's leaf where that is floating too: shapes are checked, float
    dtypes not. The dtype the state was built with is not recorded once the
    initial value is deleted: the weight may have been cast since (float32
    statistics with bfloat16 params run natively), or be absent
    (`channelwise_affine=False`). Integer and bool entries (a step counter, a
    first-time flag) keep their dtype, which the layer's definition fixes."""
    if jtu.tree_structure(expected) != jtu.tree_structure(given):
        return expected  # reported as a structure problem
    return jtu.tree_map(
        lambda e, g: (
            jax.ShapeDtypeStruct(e.shape, g.dtype) if _inexact(e) and _inexact(g) else e
        ),
        expected,
        given,
    )


def _stored(value: PyTree) -> PyTree:
    """What `eqx.nn.State` stores for an initial value: `jnp.asarray` of each leaf
    (so numpy float64 is float32 in JAX's 32-bit mode)."""
    return jtu.tree_map(jnp.asarray, value)


def _check_state(
    model: PyTree,
    state: eqx.nn.State,
    where: str,
    state_collection: str,
    buffer_collection: str,
) -> None:
    """Checks a given state against the initial values that the model's
    `StateIndex`es still hold, or, where `eqx.nn.make_with_state` deleted them,
    against those an Equinox `BatchNorm` or `SpectralNorm` is built with
    (`_derived_inits`): each entry there, with the tree structure, shapes and
    dtypes that `eqx.nn.State(model)` would store (float dtypes not, for derived
    ones: `_loosen`). Any other index whose initial value was deleted says nothing
    about shapes: only its entry's presence is checked (by
    `equinox_to_variables`). Reads only: the model and the state are neither
    changed nor consumed."""
    derived = _derived_inits(model)
    filled = set()  # markers whose initial value is derived, not held

    def known_index(x):
        if not is_state_index(x) or _holds_init(x):
            return x
        if x.marker in derived:  # a copy: the model keeps its deleted init
            filled.add(x.marker)
            return eqx.tree_at(lambda i: i.init, x, derived[x.marker])
        return None

    # The model with only the indices whose initial value is known (as shapes, no
    # compute; held ones may be `jax.ShapeDtypeStruct`s, from
    # `eqx.filter_eval_shape`), and the state `eqx.nn.State` would make of them.
    known = jtu.tree_map(known_index, model, is_leaf=is_state_index)
    leaves = jtu.tree_leaves(known, is_leaf=is_state_index)
    indices = [x for x in leaves if is_state_index(x)]
    if not indices:
        return
    names = (state_collection, buffer_collection)
    # A missing entry raises here, with the library's message and path.
    got = equinox_to_variables(known, state, *names)[state_collection]
    values, markers = state.tree_flatten()
    given = dict(zip(markers, values, strict=True))
    initial = {}
    for x in indices:
        init = jax.eval_shape(_stored, x.init)
        if x.marker in filled:
            init = _loosen(init, given[x.marker])
        initial[x.marker] = init
    initial = eqx.nn.State.tree_unflatten(tuple(initial), tuple(initial.values()))
    expected = equinox_to_variables(known, initial, *names)[state_collection]
    context = f"{where}: {state_collection}"
    problems = spec_problems(
        TreeSpec.of(expected, context),
        TreeSpec.of(got, context),
        state_collection,
        extra="entry that the initial value of its `eqx.nn.StateIndex` does not have",
    )
    if problems:
        raise AdapterError(
            _STATE_DOES_NOT_FIT.format(where=where, problems="\n".join(problems))
        )


def as_model_and_state(
    result: Any,
    where: str,
    state_collection: str = "batch_stats",
    buffer_collection: str = "constants",
) -> tuple[PyTree, eqx.nn.State | None]:
    """A factory's result, `model` or `(model, state)`, as `(model, state)`. A
    given state is checked against the initial values the model still holds
    (before `delete_init_state` removes them), or that its Equinox `BatchNorm`s
    and `SpectralNorm`s are built with."""
    if isinstance(result, tuple) and len(result) == 2:
        model, state = result
    else:
        model, state = result, None
    if not isinstance(model, eqx.Module):
        raise AdapterTypeError(
            f"{where} must return an Equinox module, or `(model, state)` as "
            "`eqx.nn.make_with_state(Model)(...)` returns, but returned "
            f"{type(result).__name__}."
        )
    if state is not None and not isinstance(state, eqx.nn.State):
        raise AdapterTypeError(
            f"{where} returned `(model, state)` whose state is a "
            f"{type(state).__name__}, not an `eqx.nn.State`."
        )
    stateful = any(map(is_state_index, jtu.tree_leaves(model, is_leaf=is_state_index)))
    if state is not None:
        _check_state(model, state, where, state_collection, buffer_collection)
    if state is None and stateful:
        try:  # a model built without make_with_state still holds its initial state
            state = eqx.nn.State(model)
        except ValueError:
            raise AdapterError(
                f"{where}: the Equinox model has state but no `eqx.nn.State` was "
                "given. Pass the state from `eqx.nn.make_with_state(Model)(...)`."
            ) from None
    return eqx.nn.delete_init_state(model), state


def call_model(
    model: PyTree,
    state: eqx.nn.State | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: PRNGKeyArray | None,
    vmap_axis: int | None,
    axis_name: Hashable | None,
    wrapper: str,
    shortcut: str,
) -> tuple[Any, eqx.nn.State | None]:
    """`model(*args, state, **kwargs, key=key)` (without `state` when `None`, without
    `key` when `None`), or with `vmap_axis`, that call mapped over the batch axis
    of every positional input with `jax.vmap` (named `axis_name`), the state
    unmapped and one key per example. A failure that means the wrong axes is an
    `AdapterError` saying which options fix it (`wrapper`, `shortcut`: the names
    of the class and function of the caller, for the messages)."""

    def call(args, key):
        kw = kwargs if key is None else {**kwargs, "key": key}
        if state is None:
            return model(*args, **kw), None
        result = model(*args, state, **kw)
        if not (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[1], eqx.nn.State)
        ):
            got = (
                f"a tuple of {len(result)}"
                if isinstance(result, tuple)
                else type(result).__name__
            )
            raise AdapterError(_NOT_A_STATE.format(got=got))
        return result

    names = {"wrapper": wrapper, "shortcut": shortcut}
    if vmap_axis is None:
        try:
            return call(args, key)
        except NameError as err:
            found = _unbound_axis(err)
            if found is None:
                raise
            raise AdapterError(
                _UNBOUND_AXIS.format(name=found, axis=None, axis_name=None, **names)
            ) from err
        except (TypeError, ValueError) as err:
            if isinstance(err, jax.errors.JAXTypeError):
                raise  # a tracer's misuse (a leaked tracer, Python control flow on
                # a traced value), not a shape error: never a batch axis' fault
            runs, name = _runs_per_example(call, args, key)
            if not runs:
                raise
            raise AdapterError(
                _WHOLE_BATCH.format(error=_first_line(err), **names, **_axis_hint(name))
            ) from err
    if not args:
        raise AdapterError(_NO_ARGS.format(**names))
    shaped = [x for x in jtu.tree_leaves(args) if jnp.ndim(x) > 0]
    if not shaped:
        raise AdapterError(_NO_ARGS.format(**names))
    size = jnp.shape(shaped[0])[vmap_axis]
    keys = None if key is None else jax.random.split(key, size)
    mapped = jax.vmap(
        call,
        in_axes=(vmap_axis, None if keys is None else 0),
        out_axes=(vmap_axis, None),
        axis_name=axis_name,
    )
    try:
        return mapped(args, keys)
    except NameError as err:
        found = _unbound_axis(err)
        if found is None:
            raise
        raise AdapterError(
            _UNBOUND_AXIS.format(
                name=found, axis=vmap_axis, axis_name=axis_name, **names
            )
        ) from err
    except ValueError as err:
        if "out_axes" not in str(err):
            raise
        raise AdapterError(
            _PER_EXAMPLE_STATE.format(
                axis=vmap_axis, axis_name=axis_name or "batch", **names
            )
        ) from err


def asks_for_key(err: Exception) -> bool:
    """Whether a model's error is about its `key` (Equinox's "Dropout requires a
    key", Python's "missing ... argument: 'key'"), not about another keyword
    argument ("unexpected keyword argument 'mask'")."""
    return re.search(r"\bkey\b", str(err)) is not None


def _unbound_axis(err: NameError) -> str | None:
    found = re.search(r"unbound axis name: (.+?)\.", str(err))
    return None if found is None else found[1]


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _runs_per_example(
    call: Callable, args: tuple[Any, ...], key: Any
) -> tuple[bool, str | None]:
    """Whether the call that failed on the whole batch runs mapped over axis 0 of
    every positional input (abstractly: `jax.eval_shape`, no compute), and the
    axis name the model reduces over, if any. Only asked after a failure."""
    leaves = jtu.tree_leaves(args)
    if not leaves or not all(getattr(x, "ndim", 0) >= 1 for x in leaves):
        return False, None
    size = leaves[0].shape[0]
    if any(x.shape[0] != size for x in leaves):
        return False, None
    keys = None if key is None else jax.random.split(key, size)
    mapped = jax.vmap(
        call, in_axes=(0, None if keys is None else 0), out_axes=(0, None)
    )
    try:
        jax.eval_shape(mapped, args, keys)
    except NameError as err:  # runs per example, once its axis is named
        name = _unbound_axis(err)
        return name is not None, name
    except Exception:
        return False, None
    return True, None


def _axis_hint(name: str | None) -> dict[str, str]:
    if name is None:
        return {"axis_name": "", "reduces": ""}
    return {
        "axis_name": f", axis_name={name!r}",
        "reduces": f" and the axis name that the model reduces over ({name!r})",
    }


class _Slot:
    """A placeholder for the model leaf (or the leaf of a state entry) that a linen
    variable fills: `Layout` builds the variables dict with these in place of the
    arrays, so that its flattened order maps each variable to its place; `spec` is
    the shape and dtype that variable must have."""

    __slots__ = ("index", "part", "spec")

    def __init__(self, leaf: Any, index: int, part: int | None = None):
        self.index, self.part = index, part
        self.spec = (tuple(leaf.shape), leaf.dtype)


class Layout:
    """Where each leaf of an Equinox model goes among linen collections, found in
    one pass over the model (a skeleton: its arrays may be
    `jax.ShapeDtypeStruct`s): the variables dict `equinox_to_variables` makes of
    it, flattened, with every leaf's shape and dtype. `fill` puts given variables
    back into the model with one flatten of the variables and one comparison per
    leaf, so that a trace does not walk the model again; anything that does not
    fit goes to the caller's `fallback` (`variables_to_equinox`, which reports
    it by path). A layout holds no array and no reference to the model itself, so
    it can be kept as long as the model lives."""

    def __init__(
        self,
        skeleton: PyTree,
        skeleton_state: eqx.nn.State | None,
        state_collection: str,
        buffer_collection: str,
    ):
        self.names = (state_collection, buffer_collection)
        flat, self.treedef = jtu.tree_flatten_with_path(
            skeleton, is_leaf=is_state_index
        )
        self.leaves: list[Any] = []  # the model's leaves; arrays are filled in
        self.states: list[tuple[int, Any, Any]] = []  # (leaf index, index, treedef)
        tokens: dict[str, dict] = {"params": {}, buffer_collection: {}}
        tokens[state_collection] = {}
        for i, (path, leaf) in enumerate(flat):
            keys = path_keys(path)
            where = "/".join(keys)
            if is_state_index(leaf):
                if skeleton_state is None:  # the library's message, by path
                    equinox_to_variables(skeleton, None, *self.names)
                try:
                    value = skeleton_state.get(leaf)  # pyright: ignore
                except KeyError:
                    equinox_to_variables(skeleton, skeleton_state, *self.names)
                    raise
                parts, value_treedef = jtu.tree_flatten(value)
                self.states.append((i, leaf, value_treedef))
                token = jtu.tree_unflatten(
                    value_treedef, [_Slot(x, i, j) for j, x in enumerate(parts)]
                )
                insert_at(tokens[state_collection], keys, token, where)
                self.leaves.append(leaf)
            elif is_arraylike(leaf):
                inexact = jnp.issubdtype(leaf.dtype, jnp.inexact)
                collection = "params" if inexact else buffer_collection
                insert_at(tokens[collection], keys, _Slot(leaf, i), where)
                self.leaves.append(None)
            else:
                self.leaves.append(leaf)
        self.tokens = {c: t for c, t in tokens.items() if t}
        # Per collection, the flattened order of its variables: the slot each
        # variable fills (with the shape and dtype it must have).
        self.order: dict[str, tuple[Any, list[_Slot]]] = {}
        for collection, tree in self.tokens.items():
            slots, treedef = jtu.tree_flatten(tree)
            self.order[collection] = (treedef, slots)

    def top_level(self) -> dict[str, tuple[str, ...]]:
        """The top-level names of each collection, as linen creates them."""
        return {c: tuple(tree) for c, tree in self.tokens.items()}

    def fill(
        self,
        variables: dict[str, dict],
        fallback: Callable[[dict[str, dict]], tuple[PyTree, eqx.nn.State | None]],
        unbox: Callable[[PyTree], PyTree] | None = None,
    ) -> tuple[PyTree, eqx.nn.State | None]:
        """The model and state holding the arrays of `variables` (no copy), when
        they have exactly the collections, entries, structure, shapes and dtypes
        of this layout; else `fallback(variables)` (unboxed). `unbox` takes
        partitioning boxes off, when the variables hold any."""

        def report():
            return fallback(variables if unbox is None else unbox(variables))

        if set(variables) != set(self.order):
            return report()
        leaves = list(self.leaves)
        parts: dict[int, dict[int, Any]] = {}
        for collection, (treedef, slots) in self.order.items():
            given, given_treedef = jtu.tree_flatten(variables[collection])
            if given_treedef != treedef and unbox is not None:
                given, given_treedef = jtu.tree_flatten(unbox(variables[collection]))
            if given_treedef != treedef:
                return report()
            for slot, x in zip(slots, given, strict=True):
                if (tuple(jnp.shape(x)), getattr(x, "dtype", None)) != slot.spec:
                    return report()
                if slot.part is None:
                    leaves[slot.index] = x
                else:
                    parts.setdefault(slot.index, {})[slot.part] = x
        model = jtu.tree_unflatten(self.treedef, leaves)
        if not self.states:
            return model, None
        markers, values = [], []
        for i, index, value_treedef in self.states:
            found = parts.get(i, {})
            markers.append(index.marker)
            values.append(
                jtu.tree_unflatten(value_treedef, [found[j] for j in range(len(found))])
            )
        return model, eqx.nn.State.tree_unflatten(tuple(markers), tuple(values))

    def state_variables(self, state: eqx.nn.State) -> dict[str, Any]:
        """The state collection of `state`, named as `equinox_to_variables` names
        it, without walking the model."""
        values = {i: jtu.tree_leaves(state.get(index)) for i, index, _ in self.states}

        def value(slot: _Slot) -> Any:
            return values[slot.index][slot.part]  # pyright: ignore

        tokens = self.tokens.get(self.names[0], {})
        return jtu.tree_map(value, tokens, is_leaf=lambda x: isinstance(x, _Slot))
