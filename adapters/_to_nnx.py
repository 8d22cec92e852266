"""An Equinox model inside Flax NNX: `EquinoxToNNX` and `to_nnx`."""

import inspect
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from flax import nnx
from jaxtyping import PRNGKeyArray, PyTree

from ._equinox_models import as_model_and_state, asks_for_key, call_model
from ._errors import AdapterError, AdapterTypeError
from ._static import Static
from ._variables import (
    check_key,
    insert_at,
    is_arraylike,
    is_state_index,
    lookup_at,
    path_keys,
    show_path,
)


_EVAL_UPDATE = """\
The Equinox model updated its state ({paths}) while this `EquinoxToNNX` is in eval
mode (`module.eval()`, which calls the model through `eqx.nn.inference_mode`). In
eval mode NNX layers leave their statistics alone, and the adapter will neither
drop this update nor apply it unasked. If the model's layers ignore `inference`
by mistake, fix them; if the model updates its state in inference on purpose (a
decode cache, a step counter), build the wrapper with `update_in_eval=True`; to
train, call `module.train()` first.\
"""

_NEEDS_KEY_IN_EVAL = """\
The Equinox model needs a `key` ({err}), but this `EquinoxToNNX` is in eval mode,
where it draws no key from its RNG stream (as NNX layers draw none when
deterministic). Pass one to the call, `module(x, key=key)`, or call
`module.train()`.\
"""

_CHANGED_UPDATE = """\
The Equinox model returned a state update that does not fit its state variables:
{problems}
An NNX variable keeps its shape and dtype here, as an `eqx.nn.State` entry does, and
the adapter will not cast or drop the update. Make the model return each state
entry with the shape and dtype it was created with.\
"""

_CHANGED_VARIABLES = """\
The variables of this `EquinoxToNNX` no longer fit the Equinox model:
{problems}
They were probably replaced (`nnx.update`, a restored checkpoint) with arrays of
another model. Restore with this module's own structure as the target
(`nnx.state(module)`), or wrap the other model with `adapters.to_nnx`.\
"""

_BATCHED = """\
This `EquinoxToNNX` holds a batch of models: every variable has leading axes {prefix}
in front of the shape it was created with, as an ensemble built under `nnx.vmap`
has. Call it inside `nnx.vmap` (e.g. `nnx.vmap(lambda m, x: m(x), in_axes=(0,
None))(module, x)`), and take `module.equinox_model()` there too.\
"""

_NEEDS_KEY = """\
The Equinox model needs a `key` ({err}). `EquinoxToNNX` draws it from its NNX RNG
stream {stream!r} in training mode, but it has none: build it with
`rngs=nnx.Rngs({stream}=0)`, or pass `key=` to the call{eval_hint}.\
"""


def _variable_value(variable: nnx.Variable) -> Any:
    return variable.get_value()


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _spec(x: Any) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype as JAX holds the value: numpy float64 is float32 in 32-bit
    mode, as it becomes under `nnx.jit`."""
    dtype = getattr(x, "dtype", None)
    dtype = jnp.result_type(x) if dtype is None else dtype
    if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return (tuple(jnp.shape(x)), dtype)


def _takes_key(model: Any) -> bool:
    """Whether the model's call accepts `key=` (by name or through `**kwargs`);
    `True` where the signature cannot be read."""
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.name == "key" and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD
        for p in parameters
    )


def _batch_prefix(pairs: list[tuple[Any, Any]]) -> tuple[int, ...] | None:
    """The leading axes that every variable's value has in front of the shape it
    was created with (the same for all), as in an ensemble from `nnx.vmap`."""
    prefixes = set()
    for (shape, dtype), (got_shape, got_dtype) in pairs:
        extra = len(got_shape) - len(shape)
        if dtype != got_dtype or extra <= 0 or tuple(got_shape[extra:]) != shape:
            return None
        prefixes.add(tuple(got_shape[:extra]))
    return prefixes.pop() if len(prefixes) == 1 else None


def _describe(spec: tuple[tuple[int, ...], Any]) -> str:
    shape, dtype = spec
    return f"{dtype}[{','.join(map(str, shape))}]"


class EquinoxToNNX(nnx.Module):
    """An Equinox model as a Flax NNX module.

    The model's inexact arrays become `nnx.Param`s, one per leaf, in the attribute
    `params`, a nested dict named by their path in the model
    (`module.params["layers"]["0"]["weight"]`); its `eqx.nn.State` entries become
    `nnx.BatchStat`s in `batch_stats`, named by the path of their
    `eqx.nn.StateIndex`; its other arrays (integer buffers) plain `nnx.Variable`s
    in `constants`. These are the names [`adapters.to_linen`][] gives the same
    arrays as linen collections. A call runs the Equinox model on the variables'
    current values and writes its state update back into the `nnx.BatchStat`s, in
    place, as NNX layers do.

    Build it with [`adapters.to_nnx`][], or inside an NNX module's `__init__`, as
    NNX layers are built, from a model or a factory: `adapters.EquinoxToNNX(
    make=lambda key: eqx.nn.MLP(...), rngs=rngs)`.

    !!! Example

        ```python
        module = adapters.to_nnx(eqx_model, state, vmap_axis=0, axis_name="batch")
        y = module(x)                            # batch statistics updated in place
        optimizer = nnx.Optimizer(module, optax.adam(1e-3), wrt=nnx.Param)
        module.eval()                            # eqx.nn.inference_mode
        eqx_model, state = module.equinox_model()
        ```
    """

    def __init__(
        self,
        model: PyTree | None = None,
        state: eqx.nn.State | None = None,
        *,
        make: Callable[[PRNGKeyArray], Any] | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        rng_stream: str = "dropout",
        vmap_axis: int | None = None,
        axis_name: Hashable | None = None,
        update_in_eval: bool = False,
    ):
        """**Arguments:**

        - `model`: an Equinox model (its arrays are shared, not copied).
        - `state`: its `eqx.nn.State`, or `None` for a stateless model (or for a
            model built without `eqx.nn.make_with_state`, whose state is then made
            with `eqx.nn.State(model)`).
        - `make`: a factory `key -> model` or `key -> (model, state)`, in place of
            `model`; it gets its key from `rngs.params()`.
        - `rngs`: an `nnx.Rngs` (or one `nnx.RngStream`) whose stream `rng_stream`
            is forked, as `nnx.Dropout` forks it, and drawn at each call in
            training mode for the model's `key=` (unless the call is given a
            `key=`), if the model's call takes a `key`. Without it the model is
            called without a key.
        - `rng_stream`: the stream of `rngs` to draw from (default `"dropout"`).
        - `vmap_axis`: if not `None`, the per-example Equinox model is mapped over
            this axis of every positional input (NNX layers take batches), its
            state unmapped.
        - `axis_name`: the name of that mapped axis, so that e.g.
            `eqx.nn.BatchNorm(axis_name=...)` reduces across the batch.
        - `update_in_eval`: allow the model to update its state in eval mode (a
            decode cache); by default such an update is an error.

        **Raises:**

        [`adapters.AdapterError`][] if the state does not fit the model, or a
        stateful model comes without its state.
        """
        where = "`adapters.to_nnx`" if make is None else "`EquinoxToNNX(make=...)`"
        if (model is None) == (make is None):
            raise AdapterError(
                "`adapters.EquinoxToNNX` takes either an Equinox `model` or a "
                "factory `make=`, exactly one of them."
            )
        if isinstance(model, nnx.Module):
            raise AdapterTypeError(
                "`adapters.to_nnx` wraps an Equinox model, but got the NNX module "
                f"{type(model).__name__}, which is NNX already. To call it from "
                "Equinox, use `adapters.to_equinox(module)`."
            )
        if make is not None:
            if state is not None:
                raise AdapterError(
                    "`EquinoxToNNX(make=...)`: the factory returns the state with the "
                    "model (`key -> (model, state)`); do not pass `state=` too."
                )
            if rngs is None:
                raise AdapterError(
                    "`EquinoxToNNX(make=...)` draws the factory's key from "
                    "`rngs.params()`: pass `rngs=nnx.Rngs(params=0)` (or the "
                    "`rngs` of the enclosing NNX module)."
                )
            # The factory's key, as NNX layers draw their initialisation keys.
            stream = rngs if isinstance(rngs, nnx.RngStream) else rngs.params
            result = make(stream())
        else:
            if not isinstance(model, eqx.Module):
                raise AdapterTypeError(
                    f"{where} expects an Equinox module (an `eqx.Module`), got "
                    f"{type(model).__name__}. For a factory, use "
                    "`adapters.EquinoxToNNX(make=..., rngs=rngs)`."
                )
            result = (model, state)
        model, state = as_model_and_state(result, where)
        if rngs is not None and not isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
            raise AdapterTypeError(
                "`rngs` must be an `nnx.Rngs` or an `nnx.RngStream`, got "
                f"{type(rngs).__name__}."
            )
        # A stream is forked (as `nnx.Dropout` forks it) only for a model that takes
        # a key, from `rngs` that have it (or NNX's fallback, `default`): `rngs`
        # given for a factory's key alone (`nnx.Rngs(params=0)`) draws nothing.
        takes_key = _takes_key(model)
        if isinstance(rngs, nnx.Rngs) and takes_key:
            has_stream = rng_stream in rngs or "default" in rngs
            self.rngs = rngs[rng_stream].fork() if has_stream else nnx.data(None)
        elif isinstance(rngs, nnx.RngStream) and takes_key:
            self.rngs = rngs.fork()
        else:
            self.rngs = nnx.data(None)
        params: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        batch_stats: dict[str, Any] = {}
        slots = []
        flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=is_state_index)
        for path, leaf in flat:
            keys = path_keys(path)
            if is_state_index(leaf):
                try:
                    value = state.get(leaf)  # pyright: ignore (state is not None)
                except KeyError:
                    raise AdapterError(
                        f"{where}: the `eqx.nn.State` does not hold the entry of the "
                        f"model's `eqx.nn.StateIndex` at {show_path(keys)!r}: it was "
                        "made for another model. Pass the state made together with "
                        "this model."
                    ) from None
                insert_at(batch_stats, keys, jtu.tree_map(nnx.BatchStat, value), where)
                specs = tuple(_spec(x) for x in jtu.tree_leaves(value))
                slots.append(("batch_stats", keys, (leaf, specs)))
            elif is_arraylike(leaf):
                inexact = jnp.issubdtype(leaf.dtype, jnp.inexact)
                kind, variable = (
                    ("params", nnx.Param) if inexact else ("constants", nnx.Variable)
                )
                insert_at(params if inexact else constants, keys, variable(leaf), where)
                slots.append((kind, keys, _spec(leaf)))
            else:
                slots.append(("static", (), leaf))
        self.params = nnx.data(params)
        self.batch_stats = nnx.data(batch_stats)
        self.constants = nnx.data(constants)
        self.deterministic = False
        self.vmap_axis = vmap_axis
        self.axis_name = axis_name
        self.rng_stream = rng_stream
        self.update_in_eval = update_in_eval
        self._takes_key = takes_key
        self._layout = Static((treedef, tuple(slots)))

    def _parts(
        self,
    ) -> tuple[list[Any], list[tuple[Any, tuple[str, ...], Any, Any]]]:
        """The leaves of the Equinox model (state indices in place), and for each
        state entry `(index, keys, variables, spec)`; each variable's value is
        checked against the shape and dtype it was created with."""
        treedef, slots = self._layout.value
        leaves, entries, problems, pairs = [], [], [], []
        for kind, keys, info in slots:
            if kind == "static":
                leaves.append(info)
            elif kind == "batch_stats":
                index, specs = info
                variables = lookup_at(self.batch_stats, keys)
                values = jtu.tree_leaves(variables, is_leaf=_is_variable)
                got = tuple(_spec(_variable_value(v)) for v in values)
                pairs += zip(specs, got)
                if got != specs:
                    problems += _problems("batch_stats", keys, specs, got)
                leaves.append(index)
                entries.append((index, keys, variables, specs))
            else:
                variable = lookup_at(getattr(self, kind), keys)
                value = _variable_value(variable)
                pairs.append((info, _spec(value)))
                if _spec(value) != info:
                    problems += _problems(kind, keys, (info,), (_spec(value),))
                leaves.append(value)
        prefix = _batch_prefix(pairs) if problems else None
        if prefix is not None:
            raise AdapterError(_BATCHED.format(prefix=prefix))
        if problems:
            raise AdapterError(_CHANGED_VARIABLES.format(problems="\n".join(problems)))
        return leaves, entries

    def equinox_model(self) -> tuple[PyTree, eqx.nn.State | None]:
        """Gives back the Equinox model and state that this module holds now.

        **Returns:**

        `(model, state)` holding the variables' current arrays (no copy),
        bit-exact; `state` is `None` for a stateless model. The model is the one
        given to [`adapters.to_nnx`][] with its arrays replaced, in the same mode
        (`module.eval()` is not applied to it).

        **Raises:**

        [`adapters.AdapterError`][] naming every variable whose shape or dtype no
        longer fits the model.
        """
        leaves, entries = self._parts()
        treedef, _ = self._layout.value
        model = jtu.tree_unflatten(treedef, leaves)
        if not entries:
            return model, None
        markers = tuple(index.marker for index, *_ in entries)
        values = tuple(
            jtu.tree_map(_variable_value, variables, is_leaf=_is_variable)
            for _, _, variables, _ in entries
        )
        return model, eqx.nn.State.tree_unflatten(markers, values)

    def __call__(
        self, *args: Any, key: PRNGKeyArray | None = None, **kwargs: Any
    ) -> Any:
        """Calls the Equinox model on the current values of this module's variables.

        **Arguments:**

        - `*args`: the model's positional inputs (mapped over `vmap_axis`, if set).
        - `key`: the model's `key=` for this call; by default drawn from the
            module's RNG stream (if it was built with `rngs`).
        - `**kwargs`: other keywords of the model's call, passed as they are.

        **Returns:**

        The model's output. A stateful model's state update is written into the
        `nnx.BatchStat` variables, in place.

        **Raises:**

        [`adapters.AdapterError`][] if the model updates its state in eval mode
        (unless `update_in_eval=True`), if an update changes an entry's shape or
        dtype, if a per-example model is given a batch without `vmap_axis`, or if
        the model reduces over an axis name that is not mapped.
        """
        leaves, entries = self._parts()
        treedef, _ = self._layout.value
        model = jtu.tree_unflatten(treedef, leaves)
        state = None
        if entries:
            state = eqx.nn.State.tree_unflatten(
                tuple(index.marker for index, *_ in entries),
                tuple(
                    jtu.tree_map(_variable_value, variables, is_leaf=_is_variable)
                    for _, _, variables, _ in entries
                ),
            )
        if self.deterministic:
            model = eqx.nn.inference_mode(model, True)
        if key is not None:
            check_key(key, "The `key` of an `EquinoxToNNX` call")
        elif self.rngs is not None and not self.deterministic:
            key = self.rngs()  # as NNX layers draw: in training mode
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
                "EquinoxToNNX",
                "adapters.to_nnx",
            )
        except (RuntimeError, TypeError) as err:
            if not self._takes_key or not asks_for_key(err) or key is not None:
                raise
            if self.deterministic and self.rngs is not None:
                raise AdapterError(_NEEDS_KEY_IN_EVAL.format(err=err)) from err
            hint = "" if self.deterministic else ", or call `module.eval()`"
            raise AdapterError(
                _NEEDS_KEY.format(err=err, stream=self.rng_stream, eval_hint=hint)
            ) from err
        if new_state is None:
            return out
        new_leaves = jtu.tree_leaves(new_state)
        if len(old_leaves) == len(new_leaves) and all(
            a is b for a, b in zip(old_leaves, new_leaves, strict=True)
        ):
            return out
        updates, problems, changed = [], [], []
        for index, keys, variables, spec in entries:
            try:
                value = new_state.get(index)
            except (KeyError, ValueError):
                problems.append(
                    f"  batch_stats/{show_path(keys)}: missing from the returned state"
                )
                continue
            targets = jtu.tree_leaves(variables, is_leaf=_is_variable)
            new = jtu.tree_leaves(value)
            got = tuple(_spec(x) for x in new)
            if len(new) != len(targets) or got != spec:
                problems += _problems("batch_stats", keys, spec, got)
                continue
            for variable, x in zip(targets, new, strict=True):
                if x is not _variable_value(variable):
                    updates.append((variable, x))
                    changed.append(keys)
        if problems:
            raise AdapterError(_CHANGED_UPDATE.format(problems="\n".join(problems)))
        if self.deterministic and not self.update_in_eval and updates:
            paths = sorted({f"batch_stats/{show_path(k)}" for k in changed})
            raise AdapterError(_EVAL_UPDATE.format(paths=", ".join(paths)))
        for variable, x in updates:
            variable.set_value(x)
        return out


def _problems(
    collection: str,
    keys: tuple[str, ...],
    expected: tuple[tuple[tuple[int, ...], Any], ...],
    got: tuple[tuple[tuple[int, ...], Any], ...],
) -> list[str]:
    where = f"{collection}/{show_path(keys)}"
    if len(expected) != len(got):
        return [f"  {where}: expected {len(expected)} arrays, got {len(got)}"]
    return [
        f"  {where}"
        + (f"[{i}]" if len(expected) > 1 else "")
        + f": expected {_describe(e)}, got {_describe(g)}"
        for i, (e, g) in enumerate(zip(expected, got, strict=True))
        if e != g
    ]


def to_nnx(
    model: PyTree,
    state: eqx.nn.State | None = None,
    *,
    rngs: nnx.Rngs | nnx.RngStream | None = None,
    rng_stream: str = "dropout",
    vmap_axis: int | None = None,
    axis_name: Hashable | None = None,
    update_in_eval: bool = False,
) -> EquinoxToNNX:
    """Wraps an Equinox model (and its state) as a Flax NNX module.

    !!! Example

        ```python
        module = adapters.to_nnx(eqx_model, state, vmap_axis=0, axis_name="batch")
        y = module(x)
        eqx_model, state = module.equinox_model()
        ```

    **Arguments:**

    - `model`: an Equinox model.
    - `state`: its `eqx.nn.State`, or `None` for a stateless model.
    - the other options are those of [`adapters.EquinoxToNNX`][].

    **Returns:**

    An [`adapters.EquinoxToNNX`][] holding the model's own arrays (no copy).
    """
    return EquinoxToNNX(
        model,
        state,
        rngs=rngs,
        rng_stream=rng_stream,
        vmap_axis=vmap_axis,
        axis_name=axis_name,
        update_in_eval=update_in_eval,
    )
