"""A Flax NNX module inside Equinox: `NNXToEquinox`."""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from flax import nnx
from flax.nnx import variablelib
from jaxtyping import PRNGKeyArray, PyTree

from . import _display
from ._errors import AdapterError, AdapterTypeError
from ._nnx_rngs import nnx_reseed
from ._static import Static
from ._variables import (
    as_jax_arrays,
    check_key,
    path_keys,
    path_str,
    spec_problems,
    TreeSpec,
)


_NOT_SPLITTABLE = """\
`adapters.to_equinox` could not split the NNX module {name} into its variables
with the `trainable` filter ({err}). `trainable` must be an NNX filter (a Variable
type such as `nnx.Param`, or a tuple of them), and NNX modules must keep their arrays
in `nnx.Variable`s and be splittable with `nnx.split(module)`.\
"""

_WRONG_STATE = """\
The state passed to this `NNXToEquinox` does not fit its NNX variables:
{problems}
The state was probably made for another model. Pass the state that
`adapters.to_equinox(nnx_module)` returned together with this model.\
"""

_GROWN = """\
During the call, the NNX module changed its {what}:
{problems}
An `eqx.nn.State` (and an Equinox model's arrays) have a fixed structure, shape and
dtype, so this update cannot be held, and the adapter will not drop it. Create every
variable with its final shape in the module's `__init__` (e.g. a decode cache with
its full length), and keep its dtype.\
"""

_PARAMS_CHANGED = """\
During the call, the NNX module assigned new values to trainable variables:
{paths}
Trainable variables are the Equinox model's own arrays and cannot be updated by a
call (a call returns only `(out, state)`), and the adapter will not drop the update.
If these variables are state (e.g. statistics), make them non-trainable: declare
them in the module with a non-trainable `nnx.Variable` type (`nnx.BatchStat`, or a
subclass of `nnx.Variable` of your own), or leave them out of the `trainable=`
filter, e.g. `trainable=nnx.All(nnx.Param, nnx.Not(nnx.PathContains({name!r})))`.\
"""

_BAD_FILTER = """\
`trainable` must be an NNX filter: a `nnx.Variable` type such as `nnx.Param`, a
tuple of them, or a filter such as `nnx.All(nnx.Param, nnx.Not(nnx.PathContains(
'w')))`; got {got!r} ({type}). ({err})\
"""


_CAPTURE_BOOL = """\
`capture={got}`: `capture` takes the collections to return, by name or as NNX
`Variable` types, e.g. `capture='intermediates'` or `capture=(nnx.Intermediate,)`,
as for `adapters.ToEquinox`; the call then returns
`((out, {{'intermediates': sown}}), state)`. For no capture, leave `capture` out
(or pass `()`).\
"""

_CAPTURE_UNKNOWN = """\
`capture=` names {name!r}, which is not a collection name that NNX knows. The known
names are {known}, each the name of an `nnx.Variable` type
(`nnx.variablelib.variable_type_from_name`). Pass one of them, e.g.
`capture='intermediates'` for `nnx.Intermediate`, or the `nnx.Variable` type that
the module sows, e.g. `capture=(MyIntermediate,)`.\
"""

_CAPTURE_NOT_A_TYPE = """\
`capture` takes collection names or `nnx.Variable` types, e.g.
`capture=('intermediates',)` or `capture=(nnx.Intermediate,)`, but got {got!r} of
type {type}.\
"""

_CAPTURE_TWICE = """\
`capture=` names the collection {name!r} twice ({entries}). Give each collection
once, by name or by type.\
"""

_CAPTURE_HELD = """\
`capture=` names collection {name!r} ({type}), which this model already holds (as
state or as trainable arrays):
{paths}
`capture` is for variables sown during the call (`self.sow`); the model's own
variables are its trainable arrays, or are returned updated in the state.\
"""

_TRACED_INFERENCE = """\
The `inference` field of this `NNXToEquinox` is a traced array, so it cannot choose
whether the NNX module runs in `eval()` mode. This happens when the whole model is
passed through `jax.jit` (or another transformation) as an argument. Use
`eqx.filter_jit`, or Equinox's partition pattern, which keeps the flag a Python
bool: `arrays, static = eqx.partition(model, eqx.is_array)`, then call
`eqx.combine(arrays, static)` inside the jitted function.\
"""

_JIT_WHOLE_MODEL = """\
An `NNXToEquinox` cannot be hashed (it holds dicts of arrays), so `jax.jit(model)`
and static arguments cannot take it. Use `eqx.filter_jit`, e.g.
`eqx.filter_jit(lambda m, x, s: m(x, s))(model, x, state)`, or Equinox's partition
pattern: `arrays, static = eqx.partition(model, eqx.is_array)` and call
`eqx.combine(arrays, static)` inside a function jitted with `jax.jit`.\
"""


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _same_leaves(a: PyTree, b: PyTree) -> list[str]:
    """Paths of `b` whose leaf is not the very array of `a` at the same path."""
    flat_a = dict(jtu.tree_flatten_with_path(a)[0])
    return [
        path_str(path)
        for path, leaf in jtu.tree_flatten_with_path(b)[0]
        if flat_a.get(path) is not leaf
    ]


def _rng_paths(state: nnx.State) -> set[tuple[Any, ...]]:
    """The paths of the RNG stream variables (`RngKey`, `RngCount`) in `state`."""
    return {
        tuple(path)
        for path, variable in nnx.to_flat_state(state)
        if isinstance(variable, nnx.RngState)
    }


def _keep(new: dict, old: dict, paths: set[tuple[Any, ...]]) -> dict:
    """`new`, with the leaves at `paths` taken from `old` (the same structure)."""
    return jtu.tree_map_with_path(
        lambda path, n, o: o if tuple(k.key for k in path) in paths else n, new, old
    )


class NNXToEquinox(_display.Displayed, eqx.Module):
    """A Flax NNX module as an Equinox module with explicit state.

    The NNX module's trainable variables (by default its `nnx.Param`s) are the
    model's array leaves, as a nested dict by attribute path
    (`model.variables["linear"]["kernel"]`); every other variable (batch
    statistics, caches, RNG keys and counts, your own `nnx.Variable` types) lives in
    an `eqx.nn.State`. At call time the NNX module is rebuilt inside the current
    trace with `nnx.merge`, called, and split again, so the NNX module's own RNG
    streams advance in the returned state exactly as they would natively; or, with
    `model(x, state, key=key)`, the call's randomness comes from `key` alone, as in
    Equinox (see [`adapters.nnx_reseed`][]).

    Build it with [`adapters.to_equinox`][] (`adapters.to_equinox(nnx_module)`).

    !!! Example

        ```python
        module = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu)
        model, state = adapters.to_equinox(module)
        out, state = model(x, state)                # NNX's own RNG streams
        out, state = model(x, state, key=key)       # this call's randomness: `key`
        module_again = model.nnx_module(state)   # a new NNX object
        ```
    """

    variables: dict
    state_index: eqx.nn.StateIndex
    inference: bool
    _graphdef: Static = eqx.field(static=True)
    _templates: Static = eqx.field(static=True, repr=False)
    _specs: tuple[TreeSpec, TreeSpec] = eqx.field(static=True, repr=False)
    trainable: Any = eqx.field(static=True)

    def __init__(
        self, module: nnx.Module, trainable: Any = nnx.Param, inference: bool = False
    ):
        """**Arguments:**

        - `module`: an initialised `flax.nnx.Module` (it is not mutated).
        - `trainable`: an NNX filter of the variables that become trainable array
            leaves (default `nnx.Param`; e.g. `(nnx.Param, MyVariable)`).
        - `inference`: if `True`, calls run the module in `eval()` mode; flipped by
            `eqx.nn.inference_mode`. With `False`, the module runs in the mode it was
            built with.
        """
        if not isinstance(module, nnx.Module):
            raise AdapterTypeError(
                "`adapters.NNXToEquinox` wraps a `flax.nnx.Module`, but got "
                f"{type(module).__qualname__}."
            )
        try:
            nnx.filterlib.to_predicate(trainable)
        except Exception as err:
            raise AdapterTypeError(
                _BAD_FILTER.format(
                    got=trainable, type=type(trainable).__name__, err=err
                )
            ) from None
        try:
            if jtu.tree_leaves(nnx.state(module, nnx.Intermediate)):
                # Values sown in earlier native calls are per call, not state (see
                # `capture=`): leave them out, on a copy of the user's module.
                module = nnx.clone(module)
                nnx.pop(module, nnx.Intermediate)
            graphdef, params, rest = nnx.split(module, trainable, ...)
        except Exception as err:
            raise AdapterError(
                _NOT_SPLITTABLE.format(name=type(module).__name__, err=err)
            ) from err
        pure_params, pure_rest = _pure(params), _pure(rest)
        specs = (TreeSpec.of(pure_params, "params"), TreeSpec.of(pure_rest, "state"))
        self.variables = as_jax_arrays(pure_params, specs[0], "trainable")
        self.state_index = eqx.nn.StateIndex(
            as_jax_arrays(pure_rest, specs[1], "state")
        )
        self.inference = inference
        self._graphdef = Static(graphdef)
        # The variables' metadata without their values: rebuilt at call time.
        # Flattened, so that two wrappings of the same module compare equal (and
        # `eqx.filter_jit` does not retrace).
        leaves, treedef = jtu.tree_flatten(jax.eval_shape(lambda: (params, rest)))
        self._templates = Static((tuple(leaves), treedef))
        self._specs = specs
        self.trainable = trainable

    def __hash__(self) -> int:
        raise AdapterTypeError(_JIT_WHOLE_MODEL)

    def _batch_prefix(self) -> tuple[int, ...]:
        """The leading axes that every trainable array has beyond the shape the
        model was built with: the ensemble axes of a model built under
        `eqx.filter_vmap`; `()` when there are none, or when they do not agree."""
        arrays = {
            path_keys(path): leaf
            for path, leaf in jtu.tree_flatten_with_path(self.variables)[0]
        }
        prefixes = set()
        for path, spec in self._specs[0].leaves:
            shape = getattr(arrays.get(path), "shape", None)
            if shape is None:
                continue  # e.g. the static half of `eqx.partition`
            shape, extra = tuple(shape), len(shape) - len(spec.shape)
            if extra < 0 or shape[extra:] != spec.shape:
                return ()
            prefixes.add(shape[:extra])
        return prefixes.pop() if len(prefixes) == 1 else ()

    def _display_fields(self) -> list[tuple[str, Any]]:
        """What `repr` shows: the NNX module's type, the trainable arrays, the state's
        shapes and dtypes (its arrays are in the `eqx.nn.State`), with the ensemble
        axes of the trainable arrays, if any, as a batched state has them."""
        graphdef = self._graphdef.value
        node = getattr(graphdef, "nodes", [graphdef])[0]  # the root's definition
        kind = getattr(node, "type", None)
        name = getattr(kind, "__name__", None) or str(kind or "Module")
        prefix = self._batch_prefix()
        state = [
            (path, jax.ShapeDtypeStruct(prefix + leaf.shape, leaf.dtype))
            for path, leaf in self._specs[1].leaves
        ]
        return [
            ("nnx_module", _display.Text(f"{name}(...)")),
            ("trainable", self.trainable),
            ("variables", self.variables),
            ("state_index", _display.StateIndex(_display.nested_shapes(state))),
            ("inference", self.inference),
        ]

    def _held_types(self) -> list[tuple[str, type]]:
        """The path and type of every variable the model holds, trainable or state."""
        leaves, treedef = self._templates.value
        held = []
        for prefix, tree in zip(
            ("variables", "state"), jtu.tree_unflatten(treedef, leaves)
        ):
            for path, variable in nnx.to_flat_state(tree):
                where = "/".join(map(str, (prefix, *path)))
                held.append((where, type(variable)))
        return held

    def _capture_types(self, capture: Any) -> dict[str, type]:
        """`capture=` as `{name: nnx.Variable type}`: a name through NNX's registry
        of collection names, a type by its registered name (else its class name)."""
        if capture is None or capture is False:
            return {}
        if capture is True:
            raise AdapterTypeError(_CAPTURE_BOOL.format(got=capture))
        if isinstance(capture, (str, type)):
            capture = (capture,)
        if not isinstance(capture, Iterable) or isinstance(capture, Mapping):
            raise AdapterTypeError(
                _CAPTURE_NOT_A_TYPE.format(got=capture, type=type(capture).__name__)
            )
        types: dict[str, type] = {}
        given: dict[str, list[Any]] = {}
        held_types = self._held_types()
        for entry in capture:
            if isinstance(entry, str):
                try:
                    kind = variablelib.variable_type_from_name(entry)
                except (ValueError, KeyError):
                    known = sorted(variablelib.VariableTypeCache)
                    raise AdapterError(
                        _CAPTURE_UNKNOWN.format(name=entry, known=known)
                    ) from None
                name = entry
            elif isinstance(entry, type) and issubclass(entry, nnx.Variable):
                kind = entry
                try:
                    name = variablelib.variable_name_from_type(entry)
                except ValueError:  # not registered: never register it (a global)
                    name = entry.__name__
            else:
                raise AdapterTypeError(
                    _CAPTURE_NOT_A_TYPE.format(got=entry, type=type(entry).__name__)
                )
            given.setdefault(name, []).append(entry)
            if len(given[name]) > 1:
                raise AdapterError(
                    _CAPTURE_TWICE.format(
                        name=name,
                        entries=", ".join(
                            repr(e) if isinstance(e, str) else e.__qualname__
                            for e in given[name]
                        ),
                    )
                )
            held = [where for where, t in held_types if issubclass(t, kind)]
            if held:
                raise AdapterError(
                    _CAPTURE_HELD.format(
                        name=name,
                        type=f"`{kind.__module__}.{kind.__qualname__}`",
                        paths="\n".join(f"  {where}" for where in held),
                    )
                )
            types[name] = kind
        return types

    def _module(self, rest: dict) -> nnx.Module:
        leaves, treedef = self._templates.value
        params, state = jtu.tree_unflatten(treedef, leaves)
        nnx.replace_by_pure_dict(params, self.variables)
        nnx.replace_by_pure_dict(state, rest)
        return nnx.merge(self._graphdef.value, params, state)

    def _rest(self, state: eqx.nn.State) -> dict:
        try:
            rest = state.get(self.state_index)
        except KeyError:
            raise AdapterError(
                _WRONG_STATE.format(problems="  the state holds none of them")
            ) from None
        problems = spec_problems(self._specs[1], TreeSpec.of(rest, "state"), "state")
        if problems:
            raise AdapterError(_WRONG_STATE.format(problems="\n".join(problems)))
        return rest

    def nnx_module(self, state: eqx.nn.State) -> nnx.Module:
        """Returns a new NNX module holding this model's trainable arrays and the
        variables in `state` (no copy), so NNX code (`nnx.state`, `nnx.split`,
        checkpointing) takes over. The module this model was built from is never
        touched.

        **Arguments:**

        - `state`: the `eqx.nn.State` of this model.
        """
        module = self._module(self._rest(state))
        if self.inference:
            module.eval()
        return module

    def __call__(
        self,
        *args: Any,
        key: PRNGKeyArray | None = None,
        method: str | Callable[..., Any] | None = None,
        capture: str
        | type[nnx.Variable]
        | Iterable[str | type[nnx.Variable]]
        | bool
        | None = (),
        **kwargs: Any,
    ) -> tuple[Any, eqx.nn.State]:
        """Calls the NNX module with this model's variables and `state`.

        **Arguments:**

        - `*args`: the inputs of the NNX call, then the `eqx.nn.State` last.
        - `key`: keyword only. Without it (`None`), the module's own RNG streams
            (`nnx.Rngs`, held as `RngKey`/`RngCount` variables in the state) draw
            the call's randomness and advance in the returned state, as natively.
            With a JAX key (new-style or a legacy `uint32[2]` one), the call's
            randomness comes from `key` alone: for this call, the rebuilt module's
            streams are reseeded with `adapters.nnx_reseed(module, key)` (see
            [`adapters.nnx_reseed`][], which reproduces the call natively), and
            the RNG variables of the state are returned unchanged, neither used
            nor advanced. A loop that passes a fresh `key=` every step is then a
            pure function of `(model, state, key)`, as in Equinox. (A keyword
            named `key` is the wrapper's own: the NNX call does not see it.)
        - `method`: another method of the module, by name (`"decode"`) or as an
            unbound function (`Model.decode`); default `__call__`.
        - `capture`: the collections sown during the call (`self.sow`) to return,
            by name or as `nnx.Variable` types: `capture="intermediates"`,
            `capture=("intermediates",)` or `capture=(nnx.Intermediate,)`, as
            for [`adapters.ToEquinox`][]. A name is turned into its type by
            `nnx.variablelib.variable_type_from_name`; a type is keyed by its
            registered name (`nnx.Intermediate` by `"intermediates"`), or by its
            class name if it has none. Captured values are never kept in the
            state. Default `()` (also `None`, `False`): nothing captured.
        - `**kwargs`: keyword arguments of the NNX call.

        **Returns:**

        `(out, state)`, the state holding every variable the call updated (batch
        statistics, caches and, without `key`, RNG counts); with `capture`,
        `((out, captured), state)`, where `captured` is a dict `{name: sown}`, each
        `sown` the nested dict (by attribute path, as `nnx.to_pure_dict` gives it)
        of what `nnx.capture` returns for that type. For example,
        `captured["intermediates"]["block"]["h"]` is the tuple of the values that
        `self.block` sowed as `"h"`.

        **Raises:**

        [`adapters.AdapterError`][] if the state is missing or of another model, if
        a variable changes shape or dtype, or if a trainable variable is assigned;
        if `capture` names a collection NNX does not know, one the model holds, or
        is `True`; if `key` is not one JAX key; and if the model's `inference`
        field is traced (the whole model given to `jax.jit`).
        """
        if not args or not isinstance(args[-1], eqx.nn.State):
            raise AdapterError(
                "`NNXToEquinox.__call__` takes the state as its last positional "
                "argument: `out, state = model(x, state)`. Use the state that "
                "`adapters.to_equinox(nnx_module)` returned."
            )
        if isinstance(self.inference, jax.core.Tracer):
            raise AdapterTypeError(_TRACED_INFERENCE)
        captured = self._capture_types(capture)
        if key is not None:
            check_key(key, "`NNXToEquinox.__call__`'s `key`")
        *inputs, state = args
        rest = self._rest(state)
        module = self._module(rest)
        if self.inference:
            module.eval()
        if key is not None:
            nnx_reseed(module, key)

        def run(module, *args, **kwargs):
            if method is None:
                return module(*args, **kwargs)
            if isinstance(method, str):
                return getattr(module, method)(*args, **kwargs)
            return method(module, *args, **kwargs)

        if captured:
            out, *sown = nnx.capture(run, *captured.values())(module, *inputs, **kwargs)
        else:
            out, sown = run(module, *inputs, **kwargs), []

        # Variables the call sowed (`nnx.Intermediate`) are per call: not state.
        # Values sown outside `nnx.capture` are per call too: never state.
        _, params, _, new_rest = nnx.split(
            module, self.trainable, nnx.Intermediate, ...
        )
        new_params = _pure(params)
        changed = _same_leaves(self.variables, new_params)
        if changed:
            raise AdapterError(
                _PARAMS_CHANGED.format(
                    paths="\n".join(f"  variables/{p}" for p in changed),
                    name=changed[0].rsplit("/", 1)[-1],
                )
            )
        rng_paths = _rng_paths(new_rest) if key is not None else set()
        new_rest = _pure(new_rest)
        problems = spec_problems(
            self._specs[1], TreeSpec.of(new_rest, "state"), "state", "new variable"
        )
        if problems:
            raise AdapterError(
                _GROWN.format(what="variables", problems="\n".join(problems))
            )
        if rng_paths:
            # With a key, the stored streams were neither used nor advanced.
            new_rest = _keep(new_rest, rest, rng_paths)
        if _same_leaves(rest, new_rest):
            # As `eqx.nn.State.set` stores it, but keeping a change of weak type
            # (a Python int counter stays a weakly typed int, as in NNX).
            new_rest = jax.tree.map(jnp.asarray, new_rest)
            state = state.update(
                eqx.nn.State.tree_unflatten((self.state_index.marker,), (new_rest,))
            )
        if captured:
            return (out, dict(zip(captured, map(_pure, sown)))), state
        return out, state
