"""A linen module inside Equinox: `ToEquinox` and `to_equinox`."""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import equinox as eqx
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import PRNGKeyArray, PyTree

from . import _display, _modes
from ._errors import AdapterError, AdapterTypeError
from ._nnx import NNXToEquinox
from ._static import Static
from ._to_equinox_messages import (
    _ALSO_UNDECLARED,
    _CAST_INPUT,
    _CHANGED_STATE,
    _FIX_GROWN,
    _FIX_RESHAPED,
    _FOREIGN_STATE,
    _IMMUTABLE,
    _INFERENCE_COLLISION,
    _JIT_WHOLE_MODEL,
    _MISSING_ARGUMENT,
    _NEEDS_KEY,
    _NO_PARAMS,
    _NO_STATE,
    _NOT_A_COLLECTION,
    _RAW_KEY_INPUT,
    _SOWN_STATE,
    _STATE_NOT_LAST,
    _TRACED_INFERENCE,
    _TRAINABLE_WRITE,
    _UNDECLARED_STREAM,
    _VARIABLES_FIRST,
    _WRONG_STATE,
)
from ._variables import (
    as_collections,
    as_jax_arrays,
    check_key,
    is_box,
    linen_rngs,
    narrowing_problems,
    normalise_names,
    spec_problems,
    specs_problems,
    TreeSpec,
    variables_problems,
)


def _type_name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _looks_like_params(variables: Mapping[str, Any]) -> bool:
    """Whether the top-level keys of `variables` read as linen submodule names
    (`Dense_0`, `Conv_1`): the `params` collection passed alone."""
    return bool(variables) and all(
        re.fullmatch(r"[A-Za-z]\w*_\d+", name) for name in variables
    )


def _sown_collections(
    linen_init: Callable[..., Any],
    key: PRNGKeyArray,
    variables: Mapping[str, Any],
    trainable: tuple[str, ...],
) -> list[str]:
    """The collections of `variables` that linen's init writes only because they
    are mutable, as `self.sow` does: with the collection made immutable, init
    (run abstractly, no compute) succeeds and leaves it out, where `self.variable`
    would have refused. Sown values would otherwise land in the state and grow, or
    accumulate, on every call. No global of Flax is touched, so building models
    from several threads at once is safe."""
    sown = []
    for collection in sorted(c for c in variables if c not in trainable):
        try:
            without = jax.eval_shape(lambda k: linen_init(k, (collection,)), key)
        except Exception:  # it needs the collection: state, not sown
            continue
        if collection not in without:
            sown.append(collection)
    return sown


def _changed_fix(
    problems: list[str], collection: str, inputs: Sequence[Any], spec: TreeSpec
) -> str:
    """The fix to give for a state update that does not fit the state."""
    if any(": new entry" in p for p in problems):
        return _FIX_GROWN.format(
            collection=collection, per_call=("intermediates", collection)
        )
    dtypes = {str(x.dtype) for x in jax.tree.leaves(inputs) if hasattr(x, "dtype")}
    held = {str(leaf.dtype) for _, leaf in spec.leaves}
    widened = sorted(
        d for d in dtypes - held if any(f"got {d}[" in p for p in problems)
    )
    if widened:
        return _CAST_INPUT.format(dtypes=", ".join(widened))
    return _FIX_RESHAPED


def _check_method(module: nn.Module, method: Any, what: str) -> None:
    """Refuses a `method=` (or `init_method=`) naming no method of the module."""
    if method is None or (callable(method) and not isinstance(method, type)):
        return
    if isinstance(method, str) and callable(getattr(type(module), method, None)):
        return
    methods = sorted(
        n
        for n, v in vars(type(module)).items()
        if callable(v) and not n.startswith("_") and n not in ("setup",)
    )
    raise AdapterError(
        f"`{what}={method!r}` names no method of {type(module).__name__}; its own "
        f"methods are {methods} (besides `__call__`). Pass a method's name, such as "
        f"`{what}={(methods or ['__call__'])[0]!r}`, or the function itself "
        f"(`{what}={type(module).__name__}.{(methods or ['__call__'])[0]}`)."
    )


# The state collections a linen module's method was seen writing in inference, by
# `_call_site`: they start mutable in later inference calls (see `_call_linen`).
_WRITES_IN_INFERENCE: dict[Any, tuple[str, ...]] = {}


def _call_site(module: nn.Module, method: Any) -> Any:
    """The module's class and the method called: what decides which collections a
    call writes, without holding the module (or its fields) alive."""
    name = method if isinstance(method, str) or method is None else method
    try:
        hash(name)
    except TypeError:
        name = id(name)
    return (type(module), name)


def _concrete_true(flag: Any) -> bool:
    """Whether `flag` is a known True: a traced flag (an ensemble's, under
    `jax.vmap`) is not."""
    if isinstance(flag, jax.core.Tracer):
        return False
    try:
        return bool(flag)
    except (TypeError, ValueError):
        return False


def _quoted(err: Exception, before: str) -> str:
    """The name flax quotes after `before` in its error message."""
    match = re.search(before + r' "([^"]+)"', str(err))
    return match.group(1) if match else "?"


def _unbound_linen_module(module: Any) -> nn.Module:
    """The linen module to wrap: refuses a class, anything but a linen module, and a
    module bound to variables."""
    if isinstance(module, type) and issubclass(module, (nn.Module, nnx.Module)):
        raise AdapterTypeError(
            f"`adapters.to_equinox` wraps a module instance, but got the class "
            f"{module.__qualname__} itself. Build the module first, e.g. "
            f"`adapters.to_equinox({module.__name__}(...), x, key=key)` with its "
            "attributes (such as `features`)."
        )
    if not isinstance(module, nn.Module):
        hint = ""
        if isinstance(module, nnx.Module):
            hint = (
                " For a Flax NNX module, call `adapters.to_equinox(module)`, "
                "which builds an `adapters.NNXToEquinox`."
            )
        raise AdapterTypeError(
            "`adapters.ToEquinox` wraps a `flax.linen.Module`, but got "
            f"{_type_name(module)}.{hint}"
        )
    if module.scope is not None:
        if module.variables:
            raise AdapterError(
                f"`adapters.ToEquinox` needs an unbound linen module, but "
                f"{type(module).__name__} is bound to variables. Pass the module "
                "definition and its variables: `module, variables = "
                "bound.unbind()`, then `to_equinox(module, variables=variables)`."
            )
        # Built inside another linen module's method (e.g. in a `ToLinen`
        # factory), linen binds it to that module; it holds nothing: use its
        # definition. The user's object is left as it is.
        module = module.clone(parent=None)
    return module


def _optional_names(
    names: str | Sequence[str] | None, what: str
) -> tuple[str, ...] | None:
    """`normalise_names`, keeping `None` (a mode option left to the conventions)."""
    return None if names is None else normalise_names(names, what)


def _method_name(method: str | Callable[..., Any] | None) -> str:
    return getattr(method, "__name__", method) or "__call__"


def _check_init_options(
    module: nn.Module,
    key: PRNGKeyArray | None,
    init_method: str | Callable[..., Any] | None,
    inference: bool | None,
    modes: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
) -> None:
    """Refuses an `init_method` that is no method, a `key` that is no key, an
    `inference=` that would be conflated with the module's own keyword, and mode
    keywords the init method does not take."""
    name, method_name = type(module).__name__, _method_name(init_method)
    _check_method(module, init_method, "init_method")
    if key is not None:
        check_key(key, f"`adapters.to_equinox({name}, ...)`'s `key`")
    train_kwarg, deterministic_kwarg = modes
    explicit = (*(train_kwarg or ()), *(deterministic_kwarg or ()))
    if (
        inference is not None
        and "inference" not in explicit
        and _modes.named(module, init_method, ("inference",))
    ):
        raise AdapterError(_INFERENCE_COLLISION.format(name=name, method=method_name))
    for mode_name in explicit:
        if not _modes.accepts(module, init_method, mode_name):
            raise AdapterError(
                f"`train_kwarg`/`deterministic_kwarg` name {mode_name!r}, but "
                f"{name}.{method_name} takes no "
                f"keyword {mode_name!r}. Name the keyword that switches the "
                "module between training and inference (e.g. `train`, "
                "`deterministic`), or leave the option out."
            )


def _linen_init(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    init_method: str | Callable[..., Any] | None,
    rng_streams: tuple[str, ...],
    modes: tuple[tuple[str, ...] | None, tuple[str, ...] | None],
    trainable: tuple[str, ...],
    per_call: tuple[str, ...],
) -> Callable[[PRNGKeyArray], Any]:
    """linen's init of `module` with the example arguments, as a function of the
    key, in inference mode, without the `per_call` collections; it refuses a
    module that sows into a collection it would otherwise put in the state."""
    name, method_name = type(module).__name__, _method_name(init_method)
    init_kwargs = _modes.mode_kwargs(
        kwargs,
        True,
        *_modes.resolve(module, init_method, *modes),
        lambda n: _modes.accepts(module, init_method, n, args),
    )
    init_streams = tuple(dict.fromkeys(("params", *rng_streams)))

    def linen_init(k, immutable=()):
        try:
            return module.init(
                linen_rngs(k, init_streams),
                *args,
                method=init_method,
                mutable=nn.DenyList((*per_call, *immutable)),
                **init_kwargs,
            )
        except TypeError as err:
            if "required" not in str(err) or "argument" not in str(err):
                raise
            found = re.search(r"argument[s]?: '(\w+)'", str(err))
            raise AdapterError(
                _MISSING_ARGUMENT.format(
                    name=name,
                    method=method_name,
                    err=err,
                    arg=found[1] if found else "train",
                )
            ) from err

    def init(k):
        variables = linen_init(k)
        sown = _sown_collections(linen_init, k, variables, trainable)
        if sown:
            raise AdapterError(
                _SOWN_STATE.format(
                    name=name,
                    collections=sown,
                    per_call=tuple(dict.fromkeys((*per_call, *sown))),
                )
            )
        return variables

    return init


def _initialised_variables(
    init: Callable[[PRNGKeyArray], Any], key: PRNGKeyArray | None, module: nn.Module
) -> dict[str, PyTree]:
    """The variables of linen's init with `key`."""
    name = type(module).__name__
    if key is None:
        raise AdapterError(
            f"`adapters.to_equinox({name}, ...)` needs `key=` to initialise "
            "the linen variables, or existing `variables=` to wrap."
        )
    return as_collections(init(key), f"{name}.init")


def _checked_variables(
    variables: PyTree,
    init: Callable[[PRNGKeyArray], Any] | None,
    key: PRNGKeyArray | None,
    module: nn.Module,
    *,
    trainable: tuple[str, ...],
    per_call: tuple[str, ...],
) -> dict[str, PyTree]:
    """The given variables without the `per_call` collections, refused if a state
    entry would be narrowed, if they do not fit what `init` (given when there are
    example arguments) creates, or if they read as the `params` collection alone."""
    name = type(module).__name__
    variables = as_collections(variables, "`variables`")
    variables = {c: t for c, t in variables.items() if c not in per_call}
    for c, t in variables.items():
        narrowed = narrowing_problems(TreeSpec.of(t, f"`variables`/{c}"), c)
        if narrowed:
            raise AdapterError(narrowed[0])
    if init is not None:
        expected = jax.eval_shape(init, jax.random.key(0) if key is None else key)
        problems = variables_problems(
            as_collections(expected, f"{name}.init"), variables, "`variables`"
        )
        if problems:
            hint = ""
            params = expected.get("params", {})
            if variables and set(variables) <= set(params):
                hint = (
                    "\nThese look like the `params` collection alone: pass "
                    "`variables={'params': params, ...}` with every "
                    "collection."
                )
            raise AdapterError(
                f"The variables do not fit {name}: linen's init with the "
                "given example arguments creates something else.\n"
                + "\n".join(problems)
                + hint
                + "\nPass the variables this module was trained with, or "
                "the example arguments it was initialised with (or no "
                "example arguments, to skip this check)."
            )
    elif not set(trainable) & set(variables) and _looks_like_params(variables):
        raise AdapterError(
            f"The variables given for {name} hold no trainable collection "
            f"{trainable} but top-level entries {sorted(variables)}, "
            "which read as submodules: the `params` collection alone. Pass "
            "`variables={'params': params, ...}` with every collection, as "
            "linen's `module.init` returns them."
        )
    return variables


def _check_trainable_collections(
    trainable: tuple[str, ...], variables: dict[str, PyTree], module: nn.Module
) -> None:
    """Refuses a `trainable` name that is no collection of the variables (`params`
    may be missing: a module without parameters)."""
    missing = [c for c in trainable if c not in variables and c != "params"]
    if missing:
        raise AdapterError(
            _NOT_A_COLLECTION.format(
                names=missing,
                verb="is" if len(missing) == 1 else "are",
                name=type(module).__name__,
                collections=sorted(variables),
            )
        )


def _split_trainable_and_state(
    variables: dict[str, PyTree], trainable: tuple[str, ...]
) -> tuple[
    dict[str, PyTree],
    dict[str, eqx.nn.StateIndex],
    tuple[tuple[str, TreeSpec], ...],
]:
    """The fields `variables` (the trainable collections, as JAX arrays),
    `state_indices` (one `eqx.nn.StateIndex` per other collection) and
    `_state_specs` (the shapes and dtypes of those collections)."""
    specs = {c: TreeSpec.of(t, f"`variables`/{c}") for c, t in variables.items()}
    variables = {c: as_jax_arrays(t, specs[c], c) for c, t in variables.items()}
    trainable_trees = {c: t for c, t in variables.items() if c in trainable}
    state_trees = {c: t for c, t in variables.items() if c not in trainable}
    state_indices = {c: eqx.nn.StateIndex(t) for c, t in state_trees.items()}
    state_specs = tuple((c, specs[c]) for c in state_trees)
    return trainable_trees, state_indices, state_specs


class ToEquinox(_display.Displayed, eqx.Module):
    """A Flax linen module as an Equinox module with explicit state.

    Trainable collections (by default `params`) are ordinary array leaves of the
    model, in linen's own nested layout, so `eqx.filter_grad`, `eqx.partition` and
    optax work on them unchanged. Every other collection (`batch_stats`, `cache`,
    ...) lives in an `eqx.nn.State`, one `eqx.nn.StateIndex` per collection, which is
    threaded through every call and returned updated.

    Build it with [`adapters.to_equinox`][], which is exactly
    `eqx.nn.make_with_state(adapters.ToEquinox)(...)`; or build a `ToEquinox` inside
    the `__init__` of a larger Equinox model, whose own `eqx.nn.make_with_state`
    then collects its state together with every other stateful layer.

    !!! Example

        ```python
        import adapters, flax.linen as nn, jax, jax.numpy as jnp

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train: bool):
                x = nn.Dense(16)(x)
                x = nn.BatchNorm(use_running_average=not train)(x)
                x = nn.Dropout(0.1, deterministic=not train)(x)
                return nn.Dense(1)(x)

        model, state = adapters.to_equinox(
            Net(), jnp.zeros((8, 4)), key=jax.random.key(0), train_kwarg="train"
        )
        out, state = model(jnp.ones((8, 4)), state, key=jax.random.key(1))
        variables = model.linen_variables(state)  # back to linen
        ```
    """

    variables: dict[str, PyTree]
    state_indices: dict[str, eqx.nn.StateIndex]
    inference: bool
    _module: Static = eqx.field(static=True)
    _state_specs: tuple[tuple[str, TreeSpec], ...] = eqx.field(static=True, repr=False)
    rng_streams: tuple[str, ...] = eqx.field(static=True)
    train_kwarg: tuple[str, ...] | None = eqx.field(static=True)
    deterministic_kwarg: tuple[str, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        module: nn.Module,
        *args: Any,
        key: PRNGKeyArray | None = None,
        variables: PyTree | None = None,
        trainable: str | Sequence[str] = ("params",),
        rng_streams: str | Sequence[str] = ("dropout",),
        train_kwarg: str | Sequence[str] | None = None,
        deterministic_kwarg: str | Sequence[str] | None = None,
        inference: bool | None = None,
        init_method: str | Callable[..., Any] | None = None,
        per_call: str | Sequence[str] = ("intermediates",),
        **kwargs: Any,
    ):
        """**Arguments:**

        - `module`: an unbound `flax.linen.Module`.
        - `*args`: example positional arguments for linen's `init`.
        - `key`: a JAX key for linen's `init`, split by
            [`adapters.linen_rngs`][] into the streams `("params", *rng_streams)`.
            Not needed when `variables` are given.
        - `variables`: existing linen variables (e.g. pretrained), wrapped as they
            are, without copying a buffer (numpy arrays and Python scalars become
            JAX arrays, with their dtype); no init is run. If example arguments are
            given too, the variables are checked against what linen's init would
            create (with `jax.eval_shape`, so no compute), and every missing, extra,
            mis-shaped or mis-typed entry is reported in one error.
        - `trainable`: the collections that become trainable array leaves
            (default `("params",)`); every other collection goes to the state.
        - `rng_streams`: the linen rng streams derived from a call's `key`
            (default `("dropout",)`).
        - `train_kwarg`: the name (or names) of a keyword of the linen call that
            means "training", passed as `not inference` (e.g. `"train"`). Default
            `None`: whichever of `train`, `training` and `is_training` the called
            method names in its signature; `()` for none.
        - `deterministic_kwarg`: the name (or names) of a keyword of the linen call
            that means "no randomness / running statistics", passed as `inference`
            (e.g. `"deterministic"`). Default `None`: whichever of
            `deterministic`, `use_running_average` and `inference` the called
            method names; `()` for none. (A conventional name is left alone where
            the module has an attribute of that name set, as
            `nn.Dropout(0.5, deterministic=True)`.)
        - `inference`: the initial value of the `inference` field (default
            `False`), which `eqx.nn.inference_mode` flips. At init, the mapped
            keywords are given their inference values (`train=False`,
            `deterministic=True`) unless `**kwargs` name them.
        - `init_method`: the linen method to run at init (linen's `method=`);
            default `__call__`.
        - `per_call`: collections written anew on every call (by `self.sow`),
            which an `eqx.nn.State` of fixed shape cannot hold (default
            `("intermediates",)`, as linen's init). Init does not create them and
            they are left out of given `variables`; ask for them at call time with
            `capture=`.
        - `**kwargs`: example keyword arguments for linen's `init`.

        **Raises:**

        [`adapters.AdapterError`][] if the variables do not fit the module, if
        there is neither `key` nor `variables` to build them from, if `trainable`
        names a collection the module does not have, or if an option is not what
        it should be.
        """
        module = _unbound_linen_module(module)
        trainable = normalise_names(trainable, "trainable")
        per_call = normalise_names(per_call, "per_call")
        self.rng_streams = normalise_names(rng_streams, "rng_streams")
        self.train_kwarg = _optional_names(train_kwarg, "train_kwarg")
        self.deterministic_kwarg = _optional_names(
            deterministic_kwarg, "deterministic_kwarg"
        )
        modes = (self.train_kwarg, self.deterministic_kwarg)
        _check_init_options(module, key, init_method, inference, modes)
        self.inference = bool(inference)
        self._module = Static(module)

        init = _linen_init(
            module,
            args,
            kwargs,
            init_method=init_method,
            rng_streams=self.rng_streams,
            modes=modes,
            trainable=trainable,
            per_call=per_call,
        )
        if variables is None:
            variables = _initialised_variables(init, key, module)
        else:
            variables = _checked_variables(
                variables,
                init if args or kwargs else None,
                key,
                module,
                trainable=trainable,
                per_call=per_call,
            )

        _check_trainable_collections(trainable, variables, module)
        self.variables, self.state_indices, self._state_specs = (
            _split_trainable_and_state(variables, trainable)
        )

    def __hash__(self) -> int:
        raise AdapterTypeError(_JIT_WHOLE_MODEL)

    @property
    def linen_module(self) -> nn.Module:
        """The wrapped (unbound) linen module."""
        return self._module.value

    def _display_fields(self) -> list[tuple[str, Any]]:
        """What `repr` shows, under the attributes' names: the linen module, the
        trainable collections (arrays), the state index of each state collection
        (with its shapes and dtypes: the arrays are in the state)."""
        fields: list[tuple[str, Any]] = [
            ("linen_module", self.linen_module),
            ("variables", self.variables),
            (
                "state_indices",
                {
                    c: _display.StateIndex(_display.nested_shapes(s.leaves))
                    for c, s in self._state_specs
                },
            ),
        ]
        fields.append(("inference", self.inference))
        mapped = _modes.resolve(
            self.linen_module, None, self.train_kwarg, self.deterministic_kwarg
        )
        for name, names in zip(("train_kwarg", "deterministic_kwarg"), mapped):
            if names:
                fields.append((name, ", ".join(names)))
        fields.append(("rng_streams", self.rng_streams))
        return fields

    def linen_variables(self, state: eqx.nn.State) -> dict[str, PyTree]:
        """Returns the full linen variables dict: trainable collections from the
        model, every other collection from `state`.

        The arrays are the model's and the state's own (no copy), with their
        dtypes (trainable collections first, then the state's), so
        `module.apply(model.linen_variables(state), ...)` is linen's native path.

        **Arguments:**

        - `state`: the `eqx.nn.State` holding this model's collections.

        **Returns:**

        A dict `{collection: nested dict}`.
        """
        # Fresh dicts holding the same arrays: editing them must not edit the model.
        return as_collections(
            {**self.variables, **self._state_collections(state)}, "variables"
        )

    def with_linen_variables(
        self, variables: PyTree
    ) -> tuple["ToEquinox", eqx.nn.State]:
        """Returns this model holding other linen variables, e.g. restored from a
        Flax checkpoint, after checking them against this model's own.

        No init runs and no example arguments are needed: every collection, path,
        shape and dtype is checked against what this model holds, and every
        mismatch is reported in one error. JAX arrays are used as they are (no
        copy); numpy arrays (as `flax.serialization` restores them) become JAX
        arrays, so that Equinox's filters and optax see them.

        !!! Example

            ```python
            restored = orbax.checkpoint.StandardCheckpointer().restore(path)
            model, state = model.with_linen_variables(restored)
            ```

        **Arguments:**

        - `variables`: a linen variables dict for the wrapped module.

        **Returns:**

        `(model, state)`: a copy of this model with the new trainable arrays, and an
        `eqx.nn.State` with the new state collections, under this model's own
        `eqx.nn.StateIndex`es (for a `ToEquinox` inside a larger model, merge it
        with `big_state.update(state)`).

        **Raises:**

        [`adapters.AdapterError`][] naming every missing, extra, mis-shaped or
        mis-typed entry.
        """
        got = as_collections(variables, "`variables`")
        expected = {c: TreeSpec.of(t, c) for c, t in self.variables.items()}
        expected.update(self._state_specs)
        problems = specs_problems(expected, got, "`variables`")
        if problems:
            raise AdapterError(
                f"The variables do not fit this `ToEquinox` of "
                f"{type(self.linen_module).__name__}:\n"
                + "\n".join(problems)
                + "\nRestore the checkpoint of this model (or wrap the module anew "
                "with `adapters.to_equinox(module, variables=...)`)."
            )
        got = {c: as_jax_arrays(t, expected[c], c) for c, t in got.items()}
        trainable = {c: got[c] for c in self.variables}
        model = eqx.tree_at(
            lambda m: m.variables,
            self,
            trainable,
            is_leaf=lambda x: x is self.variables,
        )
        markers = tuple(self.state_indices[c].marker for c, _ in self._state_specs)
        values = tuple(got[c] for c, _ in self._state_specs)
        return model, eqx.nn.State.tree_unflatten(markers, values)

    def _state_collections(self, state: eqx.nn.State) -> dict[str, PyTree]:
        """The state's collections for this model, checked against the structure,
        shapes and dtypes the model was built with."""
        out = {}
        for collection, spec in self._state_specs:
            try:
                tree = state.get(self.state_indices[collection])
            except KeyError:
                raise AdapterError(_FOREIGN_STATE.format(collection=collection))
            problems = spec_problems(spec, TreeSpec.of(tree, collection), collection)
            if problems:
                raise AdapterError(
                    _WRONG_STATE.format(
                        collection=collection, problems="\n".join(problems)
                    )
                )
            out[collection] = tree
        return out

    def __call__(
        self,
        *args: Any,
        key: PRNGKeyArray | None = None,
        method: str | Callable[..., Any] | None = None,
        capture: str | Sequence[str] = (),
        **kwargs: Any,
    ) -> tuple[Any, eqx.nn.State]:
        """Calls the linen module with the variables of this model and `state`.

        **Arguments:**

        - `*args`: the inputs of the linen call, then the `eqx.nn.State` last.
        - `key`: a JAX key, split into the declared `rng_streams` by
            [`adapters.linen_rngs`][]; needed when the module uses randomness.
        - `method`: the linen method to call (a name such as `"encode"`, or a
            function such as `Model.encode`), as linen's `apply(method=...)`;
            default `__call__`.
        - `capture`: collections created during the call that are not state (e.g.
            `"intermediates"` written by `self.sow`) and should be returned. They
            start empty on every call and are never stored in the state.
        - `**kwargs`: keyword arguments of the linen call. A keyword named by
            `train_kwarg`/`deterministic_kwarg` given here wins over the value
            derived from `inference`.

        **Returns:**

        `(out, state)`, where `state` holds every collection updated by the call;
        with `capture`, `((out, captured), state)` where `captured` is a dict
        `{collection: tree}`.

        **Raises:**

        [`adapters.AdapterError`][] if the state is missing, not last or belongs to
        another model; if the module needs a `key` that was not given or a stream
        that was not declared; if it writes to a collection the state does not
        hold, or changes a state collection's shape or dtype.
        """
        inputs, state = self._inputs_and_state(args, kwargs, method)
        capture = self._capture_names(capture)
        modes = self._call_modes(method, key, kwargs)
        held = self._state_collections(state)
        out, updates = self._call_linen(
            inputs, held, key, method, modes, capture, kwargs
        )
        changed = self._checked_updates(updates, held, inputs)
        state = self._set_state(state, changed)
        if capture:
            captured = as_collections(
                {c: updates.get(c, {}) for c in capture}, "capture"
            )
            return (out, captured), state
        return out, state

    def _inputs_and_state(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        method: str | Callable[..., Any] | None,
    ) -> tuple[list[Any], eqx.nn.State]:
        """The linen call's inputs and the state, refusing the habits of linen's
        `apply` and a misplaced state or key (a key is an input where the linen
        method takes one of its own there)."""
        for i, arg in enumerate(args[:-1]):
            if isinstance(arg, eqx.nn.State):
                raise AdapterError(_STATE_NOT_LAST.format(index=i))
            if (
                isinstance(arg, jax.Array)
                and jax.dtypes.issubdtype(arg.dtype, jax.dtypes.prng_key)
                and not _modes.takes_key_at(self.linen_module, method, args[:-1], i)
            ):
                raise AdapterError(
                    f"`ToEquinox.__call__` got a PRNG key as positional argument {i}. "
                    "The key is keyword-only, as in Equinox: "
                    "`model(x, state, key=key)`."
                )
        if args and isinstance(args[0], Mapping) and not is_box(args[0]):
            held = {*self.variables, *self.state_indices}
            if (held or {"params"}) & set(args[0]):
                raise AdapterError(
                    _VARIABLES_FIRST.format(collections=sorted(map(str, args[0])))
                )
        for habit in ("mutable", "rngs"):
            if habit in kwargs:
                raise AdapterError(
                    f"`ToEquinox.__call__` got `{habit}=`, an argument of linen's "
                    "`apply`. The wrapper makes the state collections mutable (in "
                    "inference, those the module writes) and returns the updated "
                    "state; randomness comes from one "
                    "`key=`, split into the declared `rng_streams` by "
                    "`adapters.linen_rngs`."
                )
        if not args or not isinstance(args[-1], eqx.nn.State):
            got = "missing" if not args else f"of type {type(args[-1]).__name__}"
            raise AdapterError(_NO_STATE.format(got=got))
        *inputs, state = args
        return inputs, state

    def _capture_names(self, capture: str | Sequence[str]) -> tuple[str, ...]:
        """`capture` as names of collections that this model does not hold."""
        if isinstance(capture, bool):
            raise AdapterTypeError(
                f"`capture={capture}`: `capture` takes the names of the collections "
                "to return, e.g. `capture='intermediates'` or `capture=('intermediates"
                "', 'losses')`."
            )
        capture = normalise_names(capture, "capture")
        for collection in capture:
            if collection in self.state_indices or collection in self.variables:
                raise AdapterError(
                    f"`capture=` names collection {collection!r}, which this model "
                    "already holds (as state or as trainable arrays). `capture` is "
                    "for collections created during the call; state collections are "
                    "returned updated in the state."
                )
        return capture

    def _call_modes(
        self,
        method: str | Callable[..., Any] | None,
        key: PRNGKeyArray | None,
        kwargs: dict[str, Any],
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The mode keywords the called method takes (`train_kwarg`,
        `deterministic_kwarg`), after checking `method`, `key` and the mode."""
        module = self.linen_module
        _check_method(module, method, "method")
        if key is not None:
            check_key(key, "`ToEquinox.__call__`'s `key`")
        train_kwarg, deterministic_kwarg = _modes.resolve(
            module, method, self.train_kwarg, self.deterministic_kwarg
        )
        if "inference" in kwargs and not _modes.accepts(module, method, "inference"):
            raise AdapterError(
                f"`ToEquinox.__call__` got `inference=`, which "
                f"{type(module).__name__} does not take. The wrapper's mode is its "
                "`inference` field: call `eqx.nn.inference_mode(model)(x, state)` "
                "(or `eqx.nn.inference_mode(model, False)` for training)."
            )

        if (train_kwarg or deterministic_kwarg) and isinstance(
            self.inference, jax.core.Tracer
        ):
            raise AdapterTypeError(_TRACED_INFERENCE)
        return train_kwarg, deterministic_kwarg

    def _call_linen(
        self,
        inputs: list[Any],
        held: dict[str, PyTree],
        key: PRNGKeyArray | None,
        method: str | Callable[..., Any] | None,
        modes: tuple[tuple[str, ...], tuple[str, ...]],
        capture: tuple[str, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, Mapping[str, PyTree]]:
        """linen's `apply` with the model's variables and the state's collections
        `held` and the `capture` collections mutable (in inference, the held
        collections the module writes, found by retrying): `(out, updates)`.
        linen's errors about keys, collections and params become `AdapterError`s
        that say what to do."""
        module = self.linen_module
        variables = {**self.variables, **held}
        kwargs = _modes.mode_kwargs(
            kwargs,
            self.inference,
            *modes,
            lambda name: _modes.accepts(module, method, name, tuple(inputs)),
        )
        rngs = None if key is None else linen_rngs(key, self.rng_streams)
        mutable = [*held, *capture]
        inference = _concrete_true(self.inference)
        if inference:
            # In inference, as linen's `apply(variables, x)`, the state starts
            # read-only, and a collection the module writes (a decode cache)
            # becomes mutable, as `apply(..., mutable=["cache"])` makes it. A
            # module that takes its mode from `is_mutable_collection` (a
            # BatchNorm with `use_running_average=not
            # self.is_mutable_collection("batch_stats")`) thus runs in inference.
            # Which collections a module writes is remembered, so that only its
            # first call runs twice up to the write.
            written = _WRITES_IN_INFERENCE.get(_call_site(module, method), ())
            mutable = [*capture, *(c for c in written if c in held)]
        try:
            while True:
                try:
                    result = module.apply(
                        variables,
                        *inputs,
                        rngs=rngs,
                        method=method,
                        mutable=mutable or False,
                        **kwargs,
                    )
                    break
                except (
                    flax.errors.ModifyScopeVariableError,
                    flax.errors.ScopeVariableNotFoundError,
                ) as err:
                    collection = _quoted(err, "collection")
                    if not inference or collection not in held:
                        raise
                    if collection in mutable:
                        raise
                    mutable.append(collection)
                    site = _call_site(module, method)
                    known = _WRITES_IN_INFERENCE.get(site, ())
                    _WRITES_IN_INFERENCE[site] = (*known, collection)
        except flax.errors.InvalidRngError as err:
            stream, streams = _quoted(err, "PRNG for"), self.rng_streams
            suggested = (*streams, stream)
            if key is None:
                undeclared = ""
                if stream not in streams:
                    undeclared = _ALSO_UNDECLARED.format(
                        stream=stream, suggested=suggested
                    )
                message = _NEEDS_KEY.format(
                    stream=stream, detail=err, streams=streams, undeclared=undeclared
                )
            else:
                message = _UNDECLARED_STREAM.format(
                    stream=stream, detail=err, streams=streams, suggested=suggested
                )
            raise AdapterError(message) from err
        except (
            flax.errors.ScopeCollectionNotFound,
            flax.errors.ModifyScopeVariableError,
        ) as err:
            collection = _quoted(err, "collection")
            if collection in self.variables:
                message = _TRAINABLE_WRITE.format(
                    collection=collection, trainable=tuple(self.variables), detail=err
                )
            else:
                message = _IMMUTABLE.format(
                    collection=collection,
                    detail=err,
                    state=tuple(held),
                    trainable=tuple(self.variables),
                )
            raise AdapterError(message) from err
        except flax.errors.ScopeParamNotFoundError as err:
            hint = "" if "params" in variables else ", and no `params`"
            raise AdapterError(
                _NO_PARAMS.format(
                    err=err, collections=sorted(variables), params_hint=hint
                )
            ) from err
        except AdapterError:
            raise
        except Exception as err:
            raw = [
                i
                for i, x in enumerate(inputs)
                if isinstance(x, jax.Array)
                and x.dtype == jnp.uint32
                and x.shape == (2,)
            ]
            if not raw or key is not None:
                raise
            raise AdapterError(
                _RAW_KEY_INPUT.format(type=type(err).__name__, err=err, index=raw[0])
            ) from err
        return result if mutable else (result, {})

    def _checked_updates(
        self,
        updates: Mapping[str, PyTree],
        held: dict[str, PyTree],
        inputs: list[Any],
    ) -> dict[str, PyTree]:
        """The state collections the call changed, each checked against the state's
        structure, shapes and dtypes."""
        # Every update is checked before any is stored, so that a refused call
        # leaves the caller's state as it was, and usable.
        changed = {}
        for collection, spec in self._state_specs:
            if collection not in updates:
                continue
            new = as_collections({collection: updates[collection]}, "update")
            new = new[collection]
            old_leaves = jax.tree.leaves(held[collection])
            new_leaves = jax.tree.leaves(new)
            if len(old_leaves) == len(new_leaves) and all(
                a is b for a, b in zip(old_leaves, new_leaves)
            ):
                continue  # untouched: keep the state as it is, as Equinox layers do
            problems = spec_problems(
                spec, TreeSpec.of(new, collection), collection, "new entry"
            )
            if problems:
                raise AdapterError(
                    _CHANGED_STATE.format(
                        collection=collection,
                        problems="\n".join(problems),
                        fix=_changed_fix(problems, collection, inputs, spec),
                    )
                )
            # As `eqx.nn.State.set` stores a value (Python scalars as arrays), but
            # keeping a change of weak type: linen's next call sees what a native
            # `apply` would give it.
            changed[collection] = jax.tree.map(jnp.asarray, new)
        return changed

    def _set_state(
        self, state: eqx.nn.State, changed: dict[str, PyTree]
    ) -> eqx.nn.State:
        """`state` with the `changed` collections, stored at once; as
        `eqx.nn.State.set`, this consumes `state`."""
        if not changed:
            return state
        markers = tuple(self.state_indices[c].marker for c in changed)
        return state.update(
            eqx.nn.State.tree_unflatten(markers, tuple(changed.values()))
        )


@overload
def to_equinox(
    module: nnx.Module, *, trainable: Any = None, inference: bool | None = None
) -> tuple[NNXToEquinox, eqx.nn.State]: ...


@overload
def to_equinox(
    module: nn.Module,
    *args: Any,
    key: PRNGKeyArray | None = None,
    variables: PyTree | None = None,
    trainable: Any = None,
    rng_streams: str | Sequence[str] = ("dropout",),
    train_kwarg: str | Sequence[str] | None = None,
    deterministic_kwarg: str | Sequence[str] | None = None,
    inference: bool | None = None,
    init_method: str | Callable[..., Any] | None = None,
    per_call: str | Sequence[str] = ("intermediates",),
    **kwargs: Any,
) -> tuple[ToEquinox, eqx.nn.State]: ...


def to_equinox(
    module: nn.Module | nnx.Module,
    *args: Any,
    key: PRNGKeyArray | None = None,
    variables: PyTree | None = None,
    trainable: Any = None,
    rng_streams: str | Sequence[str] = ("dropout",),
    train_kwarg: str | Sequence[str] | None = None,
    deterministic_kwarg: str | Sequence[str] | None = None,
    inference: bool | None = None,
    init_method: str | Callable[..., Any] | None = None,
    per_call: str | Sequence[str] = ("intermediates",),
    **kwargs: Any,
) -> tuple[ToEquinox | NNXToEquinox, eqx.nn.State]:
    """Wraps a linen module (or an NNX module) as an Equinox model and returns
    `(model, state)`.

    For a linen module, exactly `eqx.nn.make_with_state(adapters.ToEquinox)(...)`:
    see [`adapters.ToEquinox`][] for the arguments (`trainable` defaults to
    `("params",)`). For an initialised `flax.nnx.Module`,
    `eqx.nn.make_with_state(adapters.NNXToEquinox)(module, trainable=...,
    inference=...)`, with `trainable` an NNX filter (default `nnx.Param`); no
    example arguments or key are needed, and the linen-only options must be left
    out.

    !!! Example

        ```python
        model, state = adapters.to_equinox(nn.Dense(3), jnp.zeros((1, 4)), key=key)
        out, state = model(jnp.ones((1, 4)), state)
        ```

    **Returns:**

    `(model, state)`: the [`adapters.ToEquinox`][] (for an NNX module, the
    [`adapters.NNXToEquinox`][]) and its `eqx.nn.State`.
    """
    if isinstance(module, nnx.Module):
        linen_only = dict(
            key=key,
            variables=variables,
            train_kwarg=train_kwarg,
            deterministic_kwarg=deterministic_kwarg,
            init_method=init_method,
        )
        given = [k for k, v in linen_only.items() if v is not None]
        if rng_streams != ("dropout",):
            given.append("rng_streams")
        if per_call != ("intermediates",):
            given.append("per_call")
        if args or kwargs or given:
            raise AdapterTypeError(
                "`adapters.to_equinox(nnx_module)` takes an initialised NNX module "
                "and only `trainable=` and `inference=`; example arguments, `key`, "
                f"`variables` and the linen options do not apply (got "
                f"{', '.join(given + list(kwargs)) or 'example arguments'})."
            )
        return eqx.nn.make_with_state(NNXToEquinox)(
            module,
            trainable=nnx.Param if trainable is None else trainable,
            inference=bool(inference),
        )
    return eqx.nn.make_with_state(ToEquinox)(
        module,
        *args,
        key=key,
        variables=variables,
        trainable=("params",) if trainable is None else trainable,
        rng_streams=rng_streams,
        train_kwarg=train_kwarg,
        deterministic_kwarg=deterministic_kwarg,
        inference=inference,
        init_method=init_method,
        per_call=per_call,
        **kwargs,
    )
