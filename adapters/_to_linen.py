"""An Equinox model inside linen: `ToLinen` and `to_linen`."""

import functools
import gc
import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from . import _display
from ._equinox_models import as_model_and_state, asks_for_key, call_model, Layout
from ._errors import AdapterError, AdapterTypeError
from ._sharding import box_variables, Partition
from ._variables import (
    equinox_to_variables,
    variables_to_equinox,
)


_NOT_MUTABLE = """\
The Equinox model updated its state, but linen collection {collection!r} is not
mutable in this `apply`, and the adapter will not drop the update. Pass
`mutable=[{collection!r}]` to `apply` (and keep the returned updates), or call the
model in inference mode with `inference=True`.\
"""


_NOT_REBUILT = """\
`ToLinen(make=...)`: the factory's model keeps arrays that it made outside its array
leaves (in a static field or a closure), so it cannot be rebuilt from shapes alone,
and building it for real in the current trace failed ({err}). Build the model
once yourself and pass it: `adapters.to_linen(model, state)`, or
`ToLinen(model=model, state=state)`.\
"""

_JIT_MODEL = """\
`nn.jit(adapters.ToLinen)` decides when to retrace from a fingerprint of the
module's fields, and cannot fingerprint a `model=` that holds arrays. Give the
model through a factory instead, `nn.jit(adapters.ToLinen)(make=lambda key: model,
...)` (`lambda key: (model, state)` for a stateful model), or jit the whole `apply`
with `jax.jit`.\
"""

# The layout of each `ToLinen(model=...)`'s model, by the model's id, while the
# model lives: `(collection names, the state's leaves, Layout)`.
_LAYOUTS: dict[int, tuple[tuple[str, str], tuple[Any, ...], Layout]] = {}

# The factories known to make models that leak when built from shapes, by
# `_factory_key`: their models are built for real at once, without building them
# from shapes first. Only a cost rides on this: building for real is right for any
# factory.
_LEAKING_FACTORIES: set[Hashable] = set()


_WALK_LIMIT = 100_000  # objects; beyond, JAX's leak check decides
_ATOMS = (str, bytes, int, float, complex, bool, type(None), types.ModuleType)


def _holds_tracer(tree: Any) -> bool | None:
    """Whether a tracer is reachable from a model built from shapes: such a tracer
    died with the build (a closure over `jnp.arange(...)`, as flowjax's couplings
    keep). The walk follows every reference the garbage collector knows (fields,
    slots, containers, closures, defaults, classes defined in the factory and
    their methods) except functions' globals and modules, which hold the rest of
    the program. None when it would pass `_WALK_LIMIT` objects.

    JAX's `checking_leaks` finds the same, but builds its report by searching the
    whole heap for each leaked tracer's referrers: seconds to a minute a build in
    a large program."""
    seen: set[int] = set()
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, jax.core.Tracer):
            return True
        if isinstance(x, _ATOMS) or isinstance(x, (jax.Array, np.ndarray)):
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        if len(seen) > _WALK_LIMIT:
            return None
        if isinstance(x, type) and "<locals>" not in x.__qualname__:
            continue  # a class of a module's: nothing the factory made
        if type(x).__module__.startswith("jaxlib"):
            continue  # JAX's C++ objects: treedefs lead to the pytree registry
        if isinstance(x, types.FunctionType):
            stack += [c.cell_contents for c in _filled(x.__closure__ or ())]
            stack += [*(x.__defaults__ or ()), *(x.__kwdefaults__ or {}).values()]
            stack += list(x.__dict__.values())  # not its globals: the program's
        else:
            stack += gc.get_referents(x)
    return False


def _filled(cells: tuple[Any, ...]) -> list[Any]:
    filled = []
    for cell in cells:
        try:
            cell.cell_contents
        except ValueError:  # an empty cell
            continue
        filled.append(cell)
    return filled


def _factory_key(make: Callable) -> Hashable | None:
    """What stays the same across re-creations of a factory: a function's code (a
    lambda written in an `@nn.compact` method is a new object at every call, with
    the same code), else the callable itself (a class); None if unhashable."""
    while isinstance(make, functools.partial):
        make = make.func
    key = getattr(make, "__code__", make)
    try:
        hash(key)
    except TypeError:
        return None
    return key


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
        cls = type(self)
        if (
            self.model is not None
            and cls.__module__ == "flax.linen.transforms"
            and cls.__name__.startswith("Jit")
        ):
            raise AdapterError(_JIT_MODEL)
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
        """The model and state: real ones at init; otherwise their shapes, from
        `eqx.filter_eval_shape`, which runs no compute, unless the factory's model
        keeps arrays that it made outside its array leaves (a static field, or a
        closure over `jnp.arange(...)`, as flowjax's couplings keep): built from
        shapes, those would be tracers that die with the build. Such a model is
        built for real in the current trace instead (under `jit`, its compute is
        traced and, unused, left out of the compiled program)."""
        self._check_fields()
        names = (self.state_collection, self.buffer_collection)
        if self.make is None:
            return as_model_and_state(
                (self.model, self.state), "`ToLinen(model=...)`", *names
            )

        def make(key):
            return as_model_and_state(self.make(key), "`ToLinen(make=...)`", *names)

        if initializing:
            return make(self.make_rng("params"))
        key = jax.random.key(0)
        factory = _factory_key(self.make)
        if factory is None or factory not in _LEAKING_FACTORIES:
            skeleton = eqx.filter_eval_shape(make, key)  # the factory's errors raise
            holds = _holds_tracer(skeleton)
            if holds is None:  # too much to walk: JAX's own (slow) check decides
                try:
                    with jax.checking_leaks():  # a context of this thread only
                        return eqx.filter_eval_shape(make, key)
                except Exception:  # "Leaked trace ..."
                    holds = True
            if not holds:
                return skeleton
            if factory is not None:
                _LEAKING_FACTORIES.add(factory)
        try:
            return make(key)
        except Exception as err:
            raise AdapterError(_NOT_REBUILT.format(err=err)) from err

    @nn.nowrap
    def _layout(self) -> Layout:
        """The layout of the model outside init: for a `model=` field, computed once
        per model and state and kept while the model lives (checking the state
        and walking the model again at every trace made a trace of `ToLinen` cost
        more than one of the model itself); for a factory, from its shapes at
        every call."""
        names = (self.state_collection, self.buffer_collection)
        if self.make is not None:
            return Layout(*self._skeleton(False), *names)
        self._check_fields()
        state_leaves = tuple(jtu.tree_leaves(self.state))
        cached = _LAYOUTS.get(id(self.model))
        if (
            cached is not None
            and cached[0] == names
            and len(cached[1]) == len(state_leaves)
            and all(a is b for a, b in zip(cached[1], state_leaves, strict=True))
        ):
            return cached[2]
        layout = Layout(*self._skeleton(False), *names)
        if id(self.model) not in _LAYOUTS:
            weakref.finalize(self.model, _LAYOUTS.pop, id(self.model), None)
        # The state's leaves are held with the layout, so that their ids (compared
        # above) cannot be those of other arrays while it is kept.
        _LAYOUTS[id(self.model)] = (names, state_leaves, layout)
        return layout

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
            if collections:  # the linen variables the model becomes, by collection
                fields.append(("variables", collections))
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
            box=lambda expected: box_variables(expected, self.partition),
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
        names = (self.state_collection, self.buffer_collection)
        initial = {}
        if initializing:
            skeleton, skeleton_state = self._skeleton(initializing)
            layout = Layout(skeleton, skeleton_state, *names)
            initial = box_variables(
                equinox_to_variables(skeleton, skeleton_state, *names), self.partition
            )
        else:
            layout = self._layout()
        # Read what is there (so that a wrong shape gets the adapter's error, with
        # the whole path); create entries only at init.
        variables: dict[str, dict] = {}
        for collection, entries in layout.top_level().items():
            variables[collection] = {}
            for name in entries:
                if self.has_variable(collection, name):
                    got = self.get_variable(collection, name)
                elif not initializing:
                    continue  # reported as missing below
                elif collection == "params":
                    value = initial[collection][name]
                    got = self.param(name, lambda _, v=value: v)
                else:
                    value = initial[collection][name]
                    got = self.variable(collection, name, lambda v=value: v).value
                variables[collection][name] = got
        where = f"The variables of {self.name or 'ToLinen'}"
        if self.rng_stream is not None and self.has_rng(self.rng_stream):
            kwargs["key"] = self.make_rng(self.rng_stream)
        key = kwargs.pop("key", None)

        def report(variables):  # the full check, by path, of what does not fit
            return variables_to_equinox(
                *self._skeleton(initializing), variables, *names, where
            )

        model, state = layout.fill(
            variables,
            report,
            nn.meta.unbox,  # under a mesh: a sharding constraint, as linen
        )
        if inference is not None:
            model = eqx.nn.inference_mode(model, inference)
        # The call consumes `state` (Equinox's guard against reuse): keep its leaves.
        old_leaves = jtu.tree_leaves(state)
        try:
            out, new_state = call_model(
                model,
                state,
                args,
                kwargs,
                key,
                self.vmap_axis,
                self.axis_name,
                "ToLinen",
                "adapters.to_linen",
            )
        except (RuntimeError, TypeError) as err:
            if (
                isinstance(err, jax.errors.JAXTypeError)
                or not asks_for_key(err)
                or key is not None
            ):
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
        updates = layout.state_variables(new_state)
        for name, value in box_variables(
            {self.state_collection: updates}, self.partition
        )[self.state_collection].items():
            self.put_variable(self.state_collection, name, value)
        return out


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
    model, state = as_model_and_state(
        (model, state), "`adapters.to_linen`", state_collection, buffer_collection
    )
    variables = equinox_to_variables(model, state, state_collection, buffer_collection)
    return module, box_variables(variables, partition)
