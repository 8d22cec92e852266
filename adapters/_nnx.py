"""A Flax NNX module inside Equinox: `NNXToEquinox`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from flax import nnx
from jaxtyping import PyTree

from . import _display
from ._errors import AdapterError, AdapterTypeError
from ._static import Static
from ._variables import as_jax_arrays, path_str, spec_problems, TreeSpec


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


class NNXToEquinox(_display.Displayed, eqx.Module):
    """A Flax NNX module as an Equinox module with explicit state.

    The NNX module's trainable variables (by default its `nnx.Param`s) are the
    model's array leaves, as a nested dict by attribute path
    (`model.variables["linear"]["kernel"]`); every other variable (batch
    statistics, caches, RNG keys and counts, your own `nnx.Variable` types) lives in
    an `eqx.nn.State`. At call time the NNX module is rebuilt inside the current
    trace with `nnx.merge`, called, and split again, so the NNX module's own RNG
    streams advance in the returned state exactly as they would natively.

    Build it with [`adapters.to_equinox`][] (`adapters.to_equinox(nnx_module)`).

    !!! Example

        ```python
        module = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu)
        model, state = adapters.to_equinox(module)
        out, state = model(x, state)
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

    def _display_fields(self) -> list[tuple[str, Any]]:
        """What `repr` shows: the NNX module's type, the trainable arrays, the state's
        shapes and dtypes (its arrays are in the `eqx.nn.State`)."""
        graphdef = self._graphdef.value
        node = getattr(graphdef, "nodes", [graphdef])[0]  # the root's definition
        kind = getattr(node, "type", None)
        name = getattr(kind, "__name__", None) or str(kind or "Module")
        return [
            ("nnx_module", _display.Text(f"{name}(...)")),
            ("trainable", self.trainable),
            ("variables", self.variables),
            ("state", _display.nested_shapes(self._specs[1].leaves)),
            ("inference", self.inference),
        ]

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
        method: str | Callable[..., Any] | None = None,
        capture: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, eqx.nn.State]:
        """Calls the NNX module with this model's variables and `state`.

        **Arguments:**

        - `*args`: the inputs of the NNX call, then the `eqx.nn.State` last.
        - `method`: another method of the module, by name (`"decode"`) or as an
            unbound function (`Model.decode`); default `__call__`.
        - `capture`: if `True`, the call runs under `nnx.capture` and also returns
            the `nnx.Intermediate` values it sowed (`self.sow(nnx.Intermediate,
            ...)`), which are never kept in the state.
        - `**kwargs`: keyword arguments of the NNX call.

        **Returns:**

        `(out, state)`, the state holding every variable the call updated (batch
        statistics, caches, RNG counts); with `capture=True`,
        `((out, intermediates), state)`, `intermediates` a nested dict.

        **Raises:**

        [`adapters.AdapterError`][] if the state is missing or of another model, if
        a variable changes shape or dtype, or if a trainable variable is assigned.
        """
        if not args or not isinstance(args[-1], eqx.nn.State):
            raise AdapterError(
                "`NNXToEquinox.__call__` takes the state as its last positional "
                "argument: `out, state = model(x, state)`. Use the state that "
                "`adapters.to_equinox(nnx_module)` returned."
            )
        *inputs, state = args
        rest = self._rest(state)
        module = self._module(rest)
        if self.inference:
            module.eval()

        def run(module, *args, **kwargs):
            if method is None:
                return module(*args, **kwargs)
            if isinstance(method, str):
                return getattr(module, method)(*args, **kwargs)
            return method(module, *args, **kwargs)

        if capture:
            out, sown = nnx.capture(run, nnx.Intermediate)(module, *inputs, **kwargs)
        else:
            out = run(module, *inputs, **kwargs)

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
        new_rest = _pure(new_rest)
        problems = spec_problems(
            self._specs[1], TreeSpec.of(new_rest, "state"), "state", "new variable"
        )
        if problems:
            raise AdapterError(
                _GROWN.format(what="variables", problems="\n".join(problems))
            )
        if _same_leaves(rest, new_rest):
            # As `eqx.nn.State.set` stores it, but keeping a change of weak type
            # (a Python int counter stays a weakly typed int, as in NNX).
            new_rest = jax.tree.map(jnp.asarray, new_rest)
            state = state.update(
                eqx.nn.State.tree_unflatten((self.state_index.marker,), (new_rest,))
            )
        if capture:
            return (out, _pure(sown)), state
        return out, state
