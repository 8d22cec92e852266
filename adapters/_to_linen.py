"""An Equinox model inside linen: `ToLinen` and `to_linen`."""

import re
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from . import _display
from ._errors import AdapterError, AdapterTypeError
from ._sharding import box_variables, Partition
from ._variables import (
    equinox_to_variables,
    is_state_index,
    spec_problems,
    TreeSpec,
    variables_to_equinox,
)


_NOT_MUTABLE = """\
The Equinox model updated its state, but linen collection {collection!r} is not
mutable in this `apply`, and the adapter will not drop the update. Pass
`mutable=[{collection!r}]` to `apply` (and keep the returned updates), or call the
model in inference mode with `inference=True`.\
"""

_PER_EXAMPLE_STATE = """\
With `vmap_axis={axis}`, the Equinox model is mapped over linen's batch axis with
its state unmapped, but the model computed a different state update for each
example. Give the model's stateful layers the `axis_name` that `ToLinen` maps over
(e.g. `eqx.nn.BatchNorm(..., axis_name={axis_name!r})` with
`ToLinen(..., axis_name={axis_name!r})`), so that they reduce across the batch.\
"""


_UNBOUND_AXIS = """\
The Equinox model reduces over axis name {name!r} (e.g. an `eqx.nn.BatchNorm(...,
axis_name={name!r})`), but this `ToLinen` does not map over an axis of that name
(`vmap_axis={axis}`, `axis_name={axis_name!r}`). Name linen's batch axis as the
model's layers do: `ToLinen(..., vmap_axis=0, axis_name={name!r})`, or
`adapters.to_linen(model, state, vmap_axis=0, axis_name={name!r})`.\
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


def _as_model_and_state(
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


class ToLinen(_display.Displayed, nn.Module):
    """An Equinox model as a Flax linen module.

    The model's inexact arrays become the `params` collection, as a nested dict
    named by their path in the model (`{"layers": {"0": {"weight": ...}}}`), so
    `flax.traverse_util`, `nn.tabulate` and optax masks by name work; its other
    arrays go to a non-trainable collection (`constants`); its `eqx.nn.State`
    entries go to a state collection (`batch_stats`), named by the path of their
    `eqx.nn.StateIndex` in the model.

    Build it from an existing model with [`adapters.to_linen`][], or inside a linen
    `@nn.compact` method from a factory, `adapters.ToLinen(make=lambda key: ...)`,
    which gets its key from linen's `params` stream at init.

    !!! Example

        ```python
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                x = nn.Dense(8)(x)
                block = adapters.ToLinen(
                    make=lambda key: eqx.nn.make_with_state(eqx.nn.BatchNorm)(
                        8, axis_name="batch", mode="batch"
                    ),
                    vmap_axis=0,
                    axis_name="batch",
                )
                return block(x, inference=not train)
        ```

    **Fields:**

    - `model`: an Equinox model (with `state`), or `None` with `make`.
    - `state`: its `eqx.nn.State`, if the model is stateful.
    - `make`: a factory `key -> model` or `key -> (model, state)`, used in place of
        `model`.
    - `state_collection`: the linen collection of the state (default
        `"batch_stats"`).
    - `buffer_collection`: the linen collection of non-trainable arrays (integer
        buffers, default `"constants"`).
    - `vmap_axis`: if not `None`, the per-example Equinox model is mapped over this
        axis of every positional input (linen's batch axis), its state unmapped.
    - `axis_name`: the name of that mapped axis, so that e.g.
        `eqx.nn.BatchNorm(axis_name=...)` reduces across the batch.
    - `rng_stream`: the linen rng stream whose key is passed as the model's `key=`
        (default `"dropout"`), when `apply` is given that stream.
    - `partition`: how to shard the variables: a function `(path, shape) -> spec`
        (`path` a tuple of names such as `("layers", "0", "weight")`, `spec` a
        `PartitionSpec`, a tuple of mesh axis names, or `None` for replicated), or a
        pytree of `PartitionSpec`s shaped like the model. Named arrays are stored
        in `nn.Partitioned` boxes, so `nn.get_partition_spec` and Flax's sharding
        recipes work on the variables.
    """

    model: PyTree | None = None
    state: eqx.nn.State | None = None
    make: Callable[[PRNGKeyArray], Any] | None = None
    state_collection: str = "batch_stats"
    buffer_collection: str = "constants"
    vmap_axis: int | None = None
    axis_name: Hashable | None = None
    rng_stream: str | None = "dropout"
    partition: Partition = None

    def __post_init__(self) -> None:
        if isinstance(self.state, eqx.nn.State):
            # Hold a State of our own (the same arrays): the caller's one is consumed
            # by the caller's next native call (Equinox's guard against reuse).
            leaves, treedef = jtu.tree_flatten(self.state)
            object.__setattr__(self, "state", jtu.tree_unflatten(treedef, leaves))
        super().__post_init__()

    def _check_fields(self) -> None:
        if (self.model is None) == (self.make is None):
            raise AdapterError(
                "`adapters.ToLinen` takes either an Equinox `model=` or a factory "
                "`make=`, exactly one of them."
            )
        if self.model is not None and not isinstance(self.model, eqx.Module):
            raise AdapterTypeError(
                "`adapters.ToLinen(model=...)` expects an Equinox module, got "
                f"{type(self.model).__name__}. For a factory, use `make=`."
            )
        names = {"params", self.state_collection, self.buffer_collection}
        if len(names) != 3:
            raise AdapterError(
                "`adapters.ToLinen` needs three different collections: `params` for "
                f"the trainable arrays, `state_collection` (got "
                f"{self.state_collection!r}) and `buffer_collection` (got "
                f"{self.buffer_collection!r}). Choose other names, e.g. "
                "`state_collection='batch_stats'`."
            )

    def _skeleton(self, initializing: bool) -> tuple[PyTree, eqx.nn.State | None]:
        """The model and state: real ones at init, their shapes otherwise (from
        `eqx.filter_eval_shape`, which runs no compute)."""
        self._check_fields()
        names = (self.state_collection, self.buffer_collection)
        if self.make is None:
            return _as_model_and_state(
                (self.model, self.state), "`ToLinen(model=...)`", *names
            )

        def make(key):
            return _as_model_and_state(self.make(key), "`ToLinen(make=...)`", *names)

        if initializing:
            return make(self.make_rng("params"))
        return eqx.filter_eval_shape(make, jax.random.key(0))

    @nn.nowrap
    def _display_fields(self) -> list[tuple[str, Any]]:
        """What `repr` shows: the Equinox model (or its factory), then each linen
        collection it becomes, with its arrays' shapes and dtypes, then the options
        that are set."""
        fields: list[tuple[str, Any]] = []
        if self.model is not None:
            fields.append(("model", self.model))
            try:
                collections = equinox_to_variables(
                    self.model,
                    self.state,
                    self.state_collection,
                    self.buffer_collection,
                )
            except (AdapterError, TypeError):  # e.g. a stateful model without state:
                collections = {}  # init says so; a repr never raises
            fields += collections.items()
        else:
            fields.append(("make", self.make))
        for name in ("vmap_axis", "axis_name", "partition"):
            if getattr(self, name) is not None:
                fields.append((name, getattr(self, name)))
        fields.append(("rng_stream", self.rng_stream))
        if isinstance(self.name, str):
            fields.append(("name", self.name))
        return fields

    def equinox_model(self, variables: PyTree) -> tuple[PyTree, eqx.nn.State | None]:
        """Gives back the Equinox model and state held by `variables`.

        **Arguments:**

        - `variables`: this module's linen variables, e.g. from
            [`adapters.to_linen`][], `init`, or training (for a `ToLinen` inside
            a larger linen model, its own part: `{c: v[c]["ToLinen_0"] for c in v}`).

        **Returns:**

        `(model, state)`: the same arrays (no copy), bit-exact; `state` is `None`
        for a stateless model.

        **Raises:**

        [`adapters.AdapterError`][] naming every entry that does not fit the model.
        """
        skeleton, skeleton_state = self._skeleton(initializing=False)
        return variables_to_equinox(
            skeleton,
            skeleton_state,
            nn.meta.unbox(variables),
            self.state_collection,
            self.buffer_collection,
            "`variables`",
        )

    @nn.compact
    def __call__(self, *args: Any, inference: bool | None = None, **kwargs: Any) -> Any:
        """Calls the Equinox model with the arrays of this module's variables.

        **Arguments:**

        - `*args`: the model's positional inputs (mapped over `vmap_axis`, if set).
        - `inference`: if given, the model is called through
            `eqx.nn.inference_mode(model, inference)`.
        - `**kwargs`: other keywords of the model's call, passed as they are.

        **Returns:**

        The model's output. A stateful model's updated state is written to the
        state collection, which must then be mutable (`mutable=["batch_stats"]`).

        **Raises:**

        [`adapters.AdapterError`][] if the variables do not fit the model, or if the
        model updates its state while the state collection is not mutable.
        """
        initializing = self.is_initializing()
        skeleton, skeleton_state = self._skeleton(initializing)
        initial = equinox_to_variables(
            skeleton, skeleton_state, self.state_collection, self.buffer_collection
        )
        if initializing:
            initial = box_variables(initial, self.partition)
        # Read what is there (so that a wrong shape gets the adapter's error, with
        # the whole path); create entries only at init.
        variables: dict[str, dict] = {}
        for collection, tree in initial.items():
            variables[collection] = {}
            for name, value in tree.items():
                if self.has_variable(collection, name):
                    got = self.get_variable(collection, name)
                elif not initializing:
                    continue  # reported as missing below
                elif collection == "params":
                    got = self.param(name, lambda _, v=value: v)
                else:
                    got = self.variable(collection, name, lambda v=value: v).value
                variables[collection][name] = got
        model, state = variables_to_equinox(
            skeleton,
            skeleton_state,
            nn.meta.unbox(variables),  # under a mesh: a sharding constraint, as linen
            self.state_collection,
            self.buffer_collection,
            f"The variables of {self.name or 'ToLinen'}",
        )
        if inference is not None:
            model = eqx.nn.inference_mode(model, inference)
        if self.rng_stream is not None and self.has_rng(self.rng_stream):
            kwargs["key"] = self.make_rng(self.rng_stream)

        # The call consumes `state` (Equinox's guard against reuse): keep its leaves.
        old_leaves = jtu.tree_leaves(state)
        try:
            out, new_state = self._call_model(model, state, args, kwargs)
        except (RuntimeError, TypeError) as err:
            if "key" not in str(err) or "key" in kwargs:
                raise
            raise AdapterError(
                f"The Equinox model needs a `key` ({err}). `ToLinen` passes it from "
                f"linen's {self.rng_stream!r} rng stream: call `apply(..., "
                f"rngs={{{self.rng_stream!r}: key}})`, or run without randomness "
                "with `inference=True`."
            ) from err
        if state is None or initializing:
            return out
        new_leaves = jtu.tree_leaves(new_state)
        if all(a is b for a, b in zip(old_leaves, new_leaves, strict=True)):
            return out
        if not self.is_mutable_collection(self.state_collection):
            raise AdapterError(_NOT_MUTABLE.format(collection=self.state_collection))
        updates = equinox_to_variables(
            model, new_state, self.state_collection, self.buffer_collection
        )[self.state_collection]
        for name, value in box_variables(
            {self.state_collection: updates}, self.partition
        )[self.state_collection].items():
            self.put_variable(self.state_collection, name, value)
        return out

    @nn.nowrap  # a plain helper: linen must not record its (consumed) state argument
    def _call_model(
        self,
        model: PyTree,
        state: eqx.nn.State | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, eqx.nn.State | None]:
        def call(args, key):
            kw = kwargs if key is None else {**kwargs, "key": key}
            if state is None:
                return model(*args, **kw), None
            return model(*args, state, **kw)

        key = kwargs.pop("key", None)
        if self.vmap_axis is None:
            return call(args, key)
        axis = self.vmap_axis
        if not args:
            raise AdapterError(
                "`ToLinen(vmap_axis=...)` maps the model over the batch axis of its "
                "positional inputs, but the call has none."
            )
        size = jtu.tree_leaves(args)[0].shape[axis]
        keys = None if key is None else jax.random.split(key, size)
        mapped = jax.vmap(
            call,
            in_axes=(axis, None if keys is None else 0),
            out_axes=(axis, None),
            axis_name=self.axis_name,
        )
        try:
            return mapped(args, keys)
        except NameError as err:
            found = re.search(r"unbound axis name: (.+?)\.", str(err))
            if found is None:
                raise
            raise AdapterError(
                _UNBOUND_AXIS.format(name=found[1], axis=axis, axis_name=self.axis_name)
            ) from err
        except ValueError as err:
            if "out_axes" not in str(err):
                raise
            raise AdapterError(
                _PER_EXAMPLE_STATE.format(
                    axis=axis, axis_name=self.axis_name or "batch"
                )
            ) from err


def to_linen(
    model: PyTree,
    state: eqx.nn.State | None = None,
    *,
    state_collection: str = "batch_stats",
    buffer_collection: str = "constants",
    vmap_axis: int | None = None,
    axis_name: Hashable | None = None,
    rng_stream: str | None = "dropout",
    partition: Partition = None,
) -> tuple[ToLinen, dict[str, dict]]:
    """Wraps an Equinox model (and its state) as a linen module, with its variables.

    !!! Example

        ```python
        linen_module, variables = adapters.to_linen(eqx_model, state)
        out, updates = linen_module.apply(variables, x, mutable=["batch_stats"])
        eqx_model, state = linen_module.equinox_model({**variables, **updates})
        ```

    **Arguments:**

    - `model`: an Equinox model.
    - `state`: its `eqx.nn.State`, or `None` for a stateless model.
    - the other options are the fields of [`adapters.ToLinen`][].

    **Returns:**

    `(linen_module, variables)`: a [`adapters.ToLinen`][] and its linen variables,
    holding the model's own arrays (no copy).
    """
    module = ToLinen(
        model=model,
        state=state,
        state_collection=state_collection,
        buffer_collection=buffer_collection,
        vmap_axis=vmap_axis,
        axis_name=axis_name,
        rng_stream=rng_stream,
        partition=partition,
    )
    module._check_fields()
    model, state = _as_model_and_state(
        (model, state), "`adapters.to_linen`", state_collection, buffer_collection
    )
    variables = equinox_to_variables(model, state, state_collection, buffer_collection)
    return module, box_variables(variables, partition)
