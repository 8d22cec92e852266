"""Assertions for your own test suite: does an Equinox model compute what a Flax
model (linen or NNX) computes?

`assert_equivalent` runs both models on the same inputs and keys, in training and in
inference mode, and compares outputs, state updates, gradients of a loss with
respect to the trainable arrays, and (optionally) several optimiser steps. The
reference is a linen module with its variables, run with linen's own `apply`, or an
initialised NNX module, run with NNX's own functional API (`nnx.split` /
`nnx.merge`). Like chex's assertions it raises an `AssertionError` with one prefix,
`[adapters.testing]`, whose message names the check that failed, the first
differing leaf by its linen (or NNX) path and its Equinox path, and the errors.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from flax import nnx
from jaxtyping import PRNGKeyArray, PyTree

from ._errors import AdapterError
from ._nnx import NNXToEquinox
from ._nnx_rngs import nnx_reseed
from ._to_equinox import ToEquinox
from ._variables import is_state_index, normalise_names, path_str


__all__ = ["PREFIX", "assert_equivalent"]

PREFIX = "[adapters.testing] "
"""The start of every message of an `assert_equivalent` failure, so that a test
can tell the adapter's assertion from another `AssertionError`."""

_NO_AS_LINEN = """\
`assert_equivalent` compares the Equinox model with the linen model in linen's
layout, so it needs to know where each Equinox array goes: pass
`as_linen=lambda model, state: ...` returning a linen variables dict. For a model
wrapped with `adapters.to_equinox` this is `model.linen_variables(state)` (the
default); for a model in `adapters.to_linen`'s layout it is
`lambda m, s: adapters.to_linen(m, s)[1]`.\
"""

_NO_AS_NNX = """\
`assert_equivalent` compares the Equinox model with the NNX module in NNX's layout,
the nested dict `nnx.to_pure_dict(nnx.state(module))` (paths like `linear/kernel`),
so it needs to know where each Equinox array goes: pass
`as_nnx=lambda model, state: ...` returning that nested dict, trainable variables
and state together. For a module wrapped with `adapters.to_equinox(nnx_module)` (an
`adapters.NNXToEquinox`) the layouts are matched without it.\
"""

_NOT_A_REFERENCE = """\
`assert_equivalent` takes as its reference a `flax.linen.Module` with its variables,
`assert_equivalent(linen_module, variables, model, state, ...)`, or an initialised
`flax.nnx.Module` with `variables=None`,
`assert_equivalent(nnx_module, None, model, state, ...)`; got {got}.\
"""

_NNX_VARIABLES = """\
The reference is an NNX module, which holds its own variables, but `variables` is
{got}. Pass `variables=None`: `assert_equivalent(nnx_module, None, model, state,
...)`. (To compare with other values, assign them to the module first, e.g. with
`nnx.update(module, new_state)`.)\
"""

_LINEN_VARIABLES = """\
The reference is a linen module, which holds no variables of its own, but
`variables` is None. Pass its variables: `assert_equivalent(linen_module, variables,
model, state, ...)`, e.g. `variables = linen_module.init(key, x)`.\
"""

_AS_LINEN_FOR_NNX = """\
The reference is an NNX module, but `as_linen=` was given: `as_linen` places the
Equinox arrays in a linen reference's layout. For an NNX reference pass
`as_nnx=lambda model, state: ...` returning the nested dict
`nnx.to_pure_dict(nnx.state(module))` would give (paths like `linear/kernel`).\
"""

_AS_NNX_FOR_LINEN = """\
The reference is a linen module, but `as_nnx=` was given: `as_nnx` places the
Equinox arrays in an NNX reference's layout. For a linen reference pass
`as_linen=lambda model, state: ...` returning a linen variables dict.\
"""

_LINEN_OPTIONS_FOR_NNX = """\
The reference is an NNX module, but {names} (options of how to call a linen module)
{verb} given. An NNX module is called as it is in training mode and after
`module.eval()` in inference mode, and its own RNG streams give its randomness (with
`key=`, reseeded by `adapters.nnx_reseed`): leave {them} out.\
"""

_NNX_TRAINABLE = """\
For an NNX reference `trainable` is an NNX filter of the trainable variables, e.g.
`nnx.Param` (the default) or `(nnx.Param, MyVariable)`, not linen collection
names; got {got!r}.{err}\
"""

_NOT_SPLITTABLE = """\
`assert_equivalent` could not split the NNX reference {name} with the `trainable`
filter ({err}). NNX modules must keep their arrays in `nnx.Variable`s and be
splittable with `nnx.split(module, trainable, ...)`.\
"""


def _default_loss(out: PyTree) -> jax.Array:
    """The mean square of every inexact output leaf (of its modulus, for a complex
    leaf), summed: a scalar that depends on every output, imaginary parts
    included."""
    leaves = [x for x in jtu.tree_leaves(out) if eqx.is_inexact_array(x)]
    if not leaves:
        raise TypeError(
            PREFIX + "the output has no floating-point array to differentiate; pass "
            "`loss=` (a function of the output returning a scalar)."
        )
    return sum(_mean_square(x) for x in leaves)


def _mean_square(x: jax.Array) -> jax.Array:
    parts = (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)
    return sum(jnp.mean(jnp.square(part.astype("float32"))) for part in parts)


def _flat(tree: PyTree, root: str) -> dict[str, Any]:
    flat, _ = jtu.tree_flatten_with_path(tree)
    return {"/".join(filter(None, (root, path_str(path)))): x for path, x in flat}


def _equinox_paths(
    model: PyTree, state: eqx.nn.State | None = None, name: str = "model"
) -> dict[int, str]:
    """Maps each array (by identity) to where it sits on the Equinox side:
    `model.linear.weight`, or `state.get(model.norm.state_index)[0]`."""
    paths = {}
    flat, _ = jtu.tree_flatten_with_path(model, is_leaf=is_state_index)
    for path, leaf in flat:
        if not is_state_index(leaf):
            paths.setdefault(id(leaf), name + jtu.keystr(path))
        elif state is not None:
            try:
                value = state.get(leaf)
            except (KeyError, ValueError):
                continue
            where = f"state.get({name}{jtu.keystr(path)})"
            for value_path, x in jtu.tree_flatten_with_path(value)[0]:
                paths.setdefault(id(x), where + jtu.keystr(value_path))
    return paths


def _sources(
    mapping: Callable, model: PyTree, state: Any, name: str
) -> Callable[[str], list[str]]:
    """For a leaf that `mapping` (`as_linen` or `as_nnx`) computes, the paths of the
    model's arrays it is computed from: found by tracing `mapping` to a jaxpr and
    walking back from that leaf to the inputs it depends on. Runs only when a check
    fails."""

    def find(reference_path: str) -> list[str]:
        arrays, static = eqx.partition(model, eqx.is_array)
        flat, _ = jtu.tree_flatten_with_path(arrays)

        def leaf(arrays):
            tree = mapping(eqx.combine(arrays, static), state)
            return _flat(tree, "")[reference_path]

        try:
            jaxpr = jax.make_jaxpr(leaf)(arrays).jaxpr
        except Exception:  # a mapping that cannot be traced: no names
            return []
        needed = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
        for eqn in reversed(jaxpr.eqns):
            if any(v in needed for v in eqn.outvars):
                needed |= {v for v in eqn.invars if isinstance(v, jex_core.Var)}
        return [
            name + jtu.keystr(path)
            for (path, _), var in zip(flat, jaxpr.invars)
            if var in needed
        ]

    return find


def _dtype(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    return np.asarray(x).dtype if dtype is None else dtype


def _describe(x: Any) -> str:
    return f"{_dtype(x)}[{','.join(map(str, np.shape(x)))}]"


def _is_key(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


class _Checker:
    """Compares the reference's trees with the candidate's, leaf by leaf, and fails
    with a message naming the first leaf that differs. `reference` names the
    reference side in messages (`"linen"` or `"NNX"`), `mapping` the argument that
    puts the candidate into its layout (`"as_linen"` or `"as_nnx"`)."""

    def __init__(
        self,
        rtol: float,
        atol: float,
        reference: str = "linen",
        mapping: str = "as_linen",
    ):
        self.rtol, self.atol = rtol, atol
        self.reference, self.mapping = reference, mapping
        self.note = ""

    def fail(self, check: str, where: str, detail: str) -> None:
        verb = "differ" if check == "parameters" else "differs"
        raise AssertionError(
            f"{PREFIX}assert_equivalent failed: {check} {verb} ({where}) {detail}"
            + self.note
        )

    def trees(
        self,
        check: str,
        where: str,
        reference: PyTree,
        equinox: PyTree,
        equinox_paths: dict[int, str] | None = None,
        sources: Callable[[str], list[str]] | None = None,
    ) -> None:
        """`reference` is the reference's tree, `equinox` the candidate's, both in
        the reference's layout; `equinox_paths` names the candidate's leaves in the
        Equinox model, and `sources(path)` the Equinox arrays that a leaf the
        mapping computed (e.g. a transposed kernel) is made from."""
        ref = self.reference
        root = "output" if check == "output" else ""
        expected, got = _flat(reference, root), _flat(equinox, root)
        missing = [p for p in expected if p not in got]
        extra = [p for p in got if p not in expected]
        if missing or extra:
            self.fail(
                check,
                where,
                f"in structure: {ref} paths missing on the Equinox side: {missing}; "
                f"Equinox paths that {ref} does not have: {extra}.",
            )
        for path, want in expected.items():
            have = got[path]
            name = f"at {path!r}" if check == "output" else f"at {ref} path {path!r}"
            if equinox_paths is not None and id(have) in equinox_paths:
                name += f" (Equinox path {equinox_paths[id(have)]})"
            elif sources is not None:
                found = sources(path)
                if found:
                    name += f" (computed by `{self.mapping}` from {', '.join(found)})"
            if np.shape(want) != np.shape(have) or _dtype(want) != _dtype(have):
                self.fail(
                    check,
                    where,
                    f"{name}: {ref} {_describe(want)}, Equinox {_describe(have)}.",
                )
            detail = self.compare(want, have)
            if detail is not None:
                self.fail(check, where, f"{name}: {detail}")

    def compare(self, want: Any, have: Any) -> str | None:
        """`None` if the candidate leaf `have` matches the reference `want` (same
        shape and dtype), else what differs. Floating-point leaves are compared
        within the tolerances, complex ones as complex numbers (the errors are
        moduli of complex differences); every other dtype (integers, bools, PRNG
        keys by their key data) exactly. Nothing is cast to a narrower type."""
        dtype = _dtype(want)
        if _is_key(dtype):
            a = np.asarray(jax.random.key_data(want))
            b = np.asarray(jax.random.key_data(have))
            return self.exact(a, b, f"the key data of {dtype} keys")
        a, b = np.asarray(want), np.asarray(have)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            return self.inexact(a.astype(np.complex128), b.astype(np.complex128))
        if jnp.issubdtype(dtype, jnp.floating):
            return self.inexact(a.astype(np.float64), b.astype(np.float64))
        return self.exact(a, b, f"{dtype} values")

    def exact(self, a: np.ndarray, b: np.ndarray, what: str) -> str | None:
        differ = np.asarray(a != b, dtype=bool)
        if not differ.any():
            return None
        index = np.unravel_index(int(np.argmax(differ)), a.shape)
        at = f" at index {tuple(map(int, index))}" if a.ndim else ""
        first = (
            f"the first{at}: {self.reference} {a[index].tolist()!r}, Equinox "
            f"{b[index].tolist()!r}"
        )
        errors = ""
        if a.dtype.kind in "iu":  # exact, in Python integers: no overflow
            want, have = a[differ].astype(object), b[differ].astype(object)
            error = np.abs(have - want)
            nonzero = want != 0
            relative = error[nonzero] / np.abs(want[nonzero]).astype(np.float64)
            rel = f"{float(np.max(relative)):.3g}" if relative.size else "n/a (all 0)"
            errors = f": max abs error {int(np.max(error))}, max rel error {rel}"
        return (
            f"{int(differ.sum())} of {a.size} values differ{errors} ({what} are "
            f"compared exactly, rtol and atol do not apply; {first})."
        )

    def inexact(self, a: np.ndarray, b: np.ndarray) -> str | None:
        """`a` and `b` in float64 or complex128; `b` is close to `a` where
        `|b - a| <= atol + rtol * |a|` (the modulus, for complex values), as in
        `numpy.allclose`, and NaN in the same parts (real or imaginary)."""
        is_complex = np.iscomplexobj(a)
        parts_a = (a.real, a.imag) if is_complex else (a,)
        parts_b = (b.real, b.imag) if is_complex else (b,)
        with np.errstate(invalid="ignore", over="ignore"):
            difference = b - a
            finite = np.isfinite(a) & np.isfinite(b)
            close = np.abs(difference) <= self.atol + self.rtol * np.abs(a)
            # A non-finite value (inf, or NaN in one part of a complex number):
            # part by part, NaN equal to NaN.
            partwise = np.logical_and.reduce(
                [
                    np.isclose(pb, pa, self.rtol, self.atol, equal_nan=True)
                    for pa, pb in zip(parts_a, parts_b)
                ]
            )
            if np.where(finite, close, partwise).all():
                return None
            only_b = np.logical_or.reduce(
                [np.isnan(pb) & ~np.isnan(pa) for pa, pb in zip(parts_a, parts_b)]
            )
            only_a = np.logical_or.reduce(
                [np.isnan(pa) & ~np.isnan(pb) for pa, pb in zip(parts_a, parts_b)]
            )
            one_nan = only_a | only_b
            if one_nan.any():
                side = "Equinox" if only_b.any() else self.reference
                return (
                    f"NaN on the {side} side only, at {int(one_nan.sum())} of "
                    f"{a.size} positions."
                )
            # NaN in a difference: NaN on both sides (or inf - inf): equal there.
            parts_d = (
                (difference.real, difference.imag) if is_complex else (difference,)
            )
            error = np.sqrt(
                sum(np.square(np.where(np.isnan(d), 0.0, d)) for d in parts_d)
            )
            nonzero = (a != 0) & np.isfinite(a)  # relative to the reference's
            relative = error[nonzero] / np.abs(a[nonzero])
        rel = f"{np.max(relative):.3g}" if relative.size else "n/a (all 0)"
        moduli = "; errors are moduli of complex differences" if is_complex else ""
        return (
            f"max abs error {np.max(error):.3g}, max rel error {rel} "
            f"(rtol={self.rtol}, atol={self.atol}{moduli})."
        )


def assert_equivalent(
    reference: nn.Module | nnx.Module,
    variables: PyTree | None,
    model: PyTree,
    state: eqx.nn.State | None,
    *inputs: Any,
    key: PRNGKeyArray | None = None,
    as_linen: Callable[[PyTree, eqx.nn.State | None], PyTree] | None = None,
    as_nnx: Callable[[PyTree, eqx.nn.State | None], PyTree] | None = None,
    call: Callable[..., tuple[Any, eqx.nn.State | None]] | None = None,
    train_kwarg: str | Sequence[str] | None = None,
    deterministic_kwarg: str | Sequence[str] | None = None,
    rng_streams: str | Sequence[str] = ("dropout",),
    trainable: Any = ("params",),
    loss: Callable[[Any], jax.Array] | None = None,
    modes: Sequence[str] = ("train", "inference"),
    optimizer: Any | None = None,
    steps: int = 2,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    jit: bool = True,
) -> None:
    """Asserts that an Equinox model (and its state) computes what a Flax model
    computes: a linen module with its variables, or an initialised NNX module.

    For each mode in `modes` (`"train"`, then `"inference"` through
    `eqx.nn.inference_mode`), both models are run `steps` times on `inputs` with the
    same keys, threading their state, and compared at every step on:

    - **output**: the outputs of the two calls;
    - **state**: the updated non-trainable variables (linen's `batch_stats`,
        `cache`, ...; NNX's `BatchStat`, `Cache`, your own `nnx.Variable` types, and
        the RNG streams' `RngKey` / `RngCount` unless `key` is given);
    - **gradient**: the gradients of `loss(output)` with respect to the trainable
        variables;
    - **parameters**: with an `optimizer` (an optax `GradientTransformation`), the
        trainable variables after each update.

    A linen reference runs linen's own `apply`, through [`adapters.ToEquinox`][]
    (tested equal to it); the candidate is put into linen's layout with
    `as_linen(model, state)`, so leaves are matched by their linen path
    (`batch_stats/BatchNorm_0/mean`). An NNX reference runs natively with NNX's
    functional API: split once with `nnx.split(module, trainable, ...)`, then at
    every step `nnx.merge`, called as it is (training mode) or after `.eval()`
    (inference mode), differentiated with respect to its trainable variables and
    split again; the candidate is put into NNX's layout, the nested dict
    `nnx.to_pure_dict(nnx.state(module))`, with `as_nnx(model, state)`, so leaves
    are matched by their NNX path (`norm/mean`). For a candidate built by
    [`adapters.to_equinox`][] the layouts are matched without a mapping. With
    `jit=True` each side's step is compiled once with `eqx.filter_jit`, and a
    retrace across steps fails the assertion. Neither the reference (an NNX module
    included) nor the candidate's `state` is changed.

    !!! Example

        ```python
        adapters.testing.assert_equivalent(
            Net(), variables, eqx_model, state, x,
            key=jax.random.key(0), train_kwarg="train",
            as_linen=my_converter, optimizer=optax.adam(1e-3), steps=3,
        )
        # An NNX reference: the module itself, `variables=None`.
        model, state = adapters.to_equinox(nnx_module)
        adapters.testing.assert_equivalent(
            nnx_module, None, model, state, x,
            key=jax.random.key(0), optimizer=optax.adam(1e-3), steps=3,
        )
        ```

    **Arguments:**

    - `reference`, `variables`: the reference, a `flax.linen.Module` and its
        variables, or an initialised `flax.nnx.Module` and `None`.
    - `model`, `state`: the Equinox candidate (`state=None` if stateless).
    - `*inputs`: positional inputs, the same for both sides.
    - `key`: a JAX key; step `k` uses `step_key = jax.random.fold_in(key, k)`,
        given to the Equinox call as `key=step_key`. A linen reference gets it split
        by [`adapters.linen_rngs`][]; an NNX reference has its RNG streams reseeded
        with [`adapters.nnx_reseed`][]`(module, step_key)` before the call, and its
        stored streams are then not advanced (as a keyed call of an
        [`adapters.NNXToEquinox`][] leaves them), so the state check leaves the RNG
        streams out. Without `key`, an NNX module's own streams advance in its
        state, and are compared.
    - `as_linen`: for a linen reference, `(model, state) -> linen variables`,
        placing the Equinox arrays in linen's layout; it is also applied to the
        gradients (a pytree shaped like the model). Default:
        `model.linen_variables(state)` for an [`adapters.ToEquinox`][].
    - `as_nnx`: for an NNX reference, `(model, state) -> nested dict`, placing the
        Equinox arrays in NNX's layout (`nnx.to_pure_dict(nnx.state(module))`,
        trainable variables and state together); it is also applied to the
        gradients. Default: `model.variables` merged with
        `state.get(model.state_index)` for an [`adapters.NNXToEquinox`][].
    - `call`: `(model, *inputs, state, key=...) -> (out, state)`, how to call the
        Equinox model (e.g. with `jax.vmap` for a per-example model). Default:
        `model(*inputs, state, key=key)` (without `state` when `None`, without
        `key` when `None`).
    - `train_kwarg`, `deterministic_kwarg`, `rng_streams`: how to call a linen
        reference, as for [`adapters.to_equinox`][]; refused for an NNX reference.
    - `trainable`: which variables are trainable: for a linen reference, collection
        names (default `("params",)`); for an NNX reference, an NNX filter (the
        default means the candidate's own `trainable` filter for an
        [`adapters.NNXToEquinox`][], else `nnx.Param`).
    - `loss`: a scalar function of the output; default: the sum of the mean squares
        of the output's floating-point leaves.
    - `modes`: which of `"train"` and `"inference"` to check.
    - `optimizer`, `steps`: an optax optimiser applied on both sides after each
        step, and the number of steps (at least 2 with `jit`, so that a retrace
        shows).
    - `rtol`, `atol`: tolerances, as in `numpy.allclose`. The defaults suit float32.
        Dtypes must match exactly: compare a bfloat16 port with a bfloat16 Flax
        model (`param_dtype`/`dtype`), with about `rtol=atol=1e-2`. A port that
        reorders reductions (a transposed matmul, another attention layout) may
        need `rtol=1e-4` in float32.
    - `jit`: compile each side's step with `eqx.filter_jit` (default), or run it
        eagerly.

    **Raises:**

    `AssertionError` (prefixed `[adapters.testing]`) naming the check (output,
    state, gradient or parameters), the mode and step, the first differing leaf by
    its linen or NNX path and its Equinox path (for a leaf that `as_linen` or
    `as_nnx` computes, e.g. a transposed kernel, the Equinox arrays it is computed
    from), and the max absolute and relative errors, or where a NaN appears on one
    side only; also when a jitted step retraces.
    `TypeError` (prefixed too) if the reference is neither a linen nor an NNX
    module, if `variables` does not fit it (`None` exactly for an NNX module), if
    the mapping of the other kind of reference is given (`as_linen` for NNX,
    `as_nnx` for linen), or if the model's layout cannot be matched without one.
    """
    for mode in modes:
        if mode not in ("train", "inference"):
            raise ValueError(
                f"{PREFIX}`modes` holds {mode!r}; use 'train' and/or 'inference'."
            )
    if isinstance(reference, nnx.Module):
        if variables is not None:
            raise TypeError(
                PREFIX + _NNX_VARIABLES.format(got=f"a {type(variables).__name__}")
            )
        if as_linen is not None:
            raise TypeError(PREFIX + _AS_LINEN_FOR_NNX)
        _refuse_linen_options(train_kwarg, deterministic_kwarg, rng_streams)
        if as_nnx is None:
            if not isinstance(model, NNXToEquinox):
                raise TypeError(PREFIX + _NO_AS_NNX)
            as_nnx = _wrapped_as_nnx
        mapping = as_nnx
        ref = _NNXReference(
            reference, _nnx_trainable(trainable, model), keyed=key is not None
        )
    elif isinstance(reference, nn.Module):
        if variables is None:
            raise TypeError(PREFIX + _LINEN_VARIABLES)
        if as_nnx is not None:
            raise TypeError(PREFIX + _AS_NNX_FOR_LINEN)
        if as_linen is None:
            if not isinstance(model, ToEquinox):
                raise TypeError(PREFIX + _NO_AS_LINEN)
            as_linen = _wrapped_as_linen
        mapping = as_linen
        ref = _LinenReference(
            reference,
            variables,
            trainable=normalise_names(trainable, "trainable"),
            rng_streams=rng_streams,
            train_kwarg=train_kwarg,
            deterministic_kwarg=deterministic_kwarg,
        )
    else:
        raise TypeError(
            PREFIX + _NOT_A_REFERENCE.format(got=f"a {type(reference).__qualname__}")
        )
    if call is None:
        call = _default_call
    loss_fn = _default_loss if loss is None else loss
    steps = max(steps, 2) if jit else max(steps, 1)
    checker = _Checker(rtol, atol, ref.name, ref.mapping)

    for mode in modes:
        inference = mode == "inference"
        ref.start(mode, inputs, loss_fn, optimizer, jit)
        eqx_step = _make_step(call, inputs, loss_fn, optimizer, jit)
        cand = _Side(eqx.nn.inference_mode(model, inference), state, optimizer)
        for k in range(steps):
            where = f"{mode} mode, step {k}"
            step_key = None if key is None else jax.random.fold_in(key, k)
            ref_out, ref_grads = ref.step(step_key, where)
            out, grads = cand.step(eqx_step, step_key, where, "Equinox")
            if mode == "train" and key is not None:
                checker.note = (
                    " (In train mode both sides draw random numbers: if the Equinox "
                    "model draws its own, e.g. its own dropout masks, it cannot match "
                    f"{ref.name}'s; compare with `modes=('inference',)`.)"
                )
            else:
                checker.note = ""
            checker.trees("output", where, ref_out, out)

            ref_vars = ref.variables()
            cand_vars = mapping(cand.model, cand.state)
            cand_paths = _equinox_paths(cand.model, cand.state)
            cand_sources = _sources(mapping, cand.model, cand.state, "model")
            checker.trees(
                "state",
                where,
                ref.select(ref_vars, trainable=False),
                ref.select(cand_vars, trainable=False),
                cand_paths,
                cand_sources,
            )
            grad_vars = mapping(grads, cand.state)
            checker.trees(
                "gradient",
                where,
                ref_grads,
                ref.select(grad_vars, trainable=True),
                _equinox_paths(grads, name="grads"),
                _sources(mapping, grads, cand.state, "grads"),
            )
            if optimizer is not None:
                checker.trees(
                    "parameters",
                    f"{where}, after the optimiser update",
                    ref.select(ref_vars, trainable=True),
                    ref.select(cand_vars, trainable=True),
                    cand_paths,
                    cand_sources,
                )


def _refuse_linen_options(
    train_kwarg: Any, deterministic_kwarg: Any, rng_streams: Any
) -> None:
    streams = normalise_names(rng_streams, "rng_streams")
    given = [
        f"`{name}`"
        for name, value, default in (
            ("train_kwarg", train_kwarg, None),
            ("deterministic_kwarg", deterministic_kwarg, None),
            ("rng_streams", streams, ("dropout",)),
        )
        if value != default
    ]
    if given:
        raise TypeError(
            PREFIX
            + _LINEN_OPTIONS_FOR_NNX.format(
                names=" and ".join(given),
                verb="was" if len(given) == 1 else "were",
                them="it" if len(given) == 1 else "them",
            )
        )


def _nnx_trainable(trainable: Any, model: PyTree) -> Any:
    """The NNX filter of the reference's trainable variables: linen's default,
    `("params",)`, means the candidate's own filter for an `NNXToEquinox`, else
    `nnx.Param`."""
    names = (trainable,) if isinstance(trainable, str) else trainable
    if isinstance(names, (tuple, list)) and list(names) == ["params"]:
        return model.trainable if isinstance(model, NNXToEquinox) else nnx.Param
    if isinstance(names, (tuple, list)) and any(isinstance(n, str) for n in names):
        raise TypeError(PREFIX + _NNX_TRAINABLE.format(got=trainable, err=""))
    try:
        nnx.filterlib.to_predicate(trainable)
    except Exception as err:
        raise TypeError(
            PREFIX + _NNX_TRAINABLE.format(got=trainable, err=f" ({err})")
        ) from None
    return trainable


class _Side:
    """One side of the comparison: a model, its state and optimiser state."""

    def __init__(self, model: PyTree, state: PyTree, optimizer: Any | None = None):
        # A State of our own (the same arrays): an eager call consumes the State it
        # is given, and the caller's must stay usable. (NNX variables are copied so
        # too: the reference's step never touches the caller's module.)
        leaves, treedef = jtu.tree_flatten(state)
        self.state = jtu.tree_unflatten(treedef, leaves)
        # Weakly typed arrays (from Python scalars) become strongly typed after
        # the first update, which would retrace the step: start strong.
        self.model = jtu.tree_map(_strong, model)
        self.opt_state = (
            None
            if optimizer is None
            else optimizer.init(eqx.filter(self.model, eqx.is_inexact_array))
        )

    def step(
        self, step: Callable, key: PRNGKeyArray | None, where: str, side: str
    ) -> tuple[Any, PyTree]:
        try:
            out, self.state, grads, self.model, self.opt_state = step(
                self.model, self.state, key, self.opt_state
            )
        except RuntimeError as err:
            if "can only be traced" not in str(err):
                raise
            raise AssertionError(
                f"{PREFIX}assert_equivalent failed: the jitted step of the {side} "
                f"side retraced ({where}): an argument changed its structure, shape "
                f"or dtype between steps, so each step compiles anew. {err}"
            ) from err
        return out, grads


class _Reference:
    """The reference side of `assert_equivalent`, behind what the comparison needs:
    `start(mode, ...)` before a mode's first step, `step(key, where)` returning the
    output and the gradients in the reference's layout, `variables()` (all of its
    variables in that layout) and `select(tree, trainable)`, the trainable part of
    a tree in that layout (the reference's or the candidate's), or the rest.

    It runs as the candidate does, a `_Side` stepped by `_make_step`: its own
    `model` (the trainable arrays) and `state`, and `call(inference)`, how to call
    them."""

    name = ""  # in messages: "linen" or "NNX"
    mapping = ""  # the argument that maps the candidate: "as_linen" or "as_nnx"

    def __init__(self, model: PyTree, state: PyTree):
        self.model, self.state = model, state

    def in_mode(self, inference: bool) -> PyTree:
        return self.model

    def call(self, inference: bool) -> Callable[..., tuple[Any, PyTree]]:
        raise NotImplementedError

    def gradients(self, grads: PyTree) -> PyTree:
        raise NotImplementedError

    def variables(self) -> PyTree:
        raise NotImplementedError

    def select(self, tree: PyTree, trainable: bool) -> PyTree:
        raise NotImplementedError

    def start(
        self,
        mode: str,
        inputs: tuple[Any, ...],
        loss: Callable[[Any], jax.Array],
        optimizer: Any | None,
        jit: bool,
    ) -> None:
        inference = mode == "inference"
        self.mode = mode
        self.run = _make_step(self.call(inference), inputs, loss, optimizer, jit)
        self.side = _Side(self.in_mode(inference), self.state, optimizer)

    def step(self, key: PRNGKeyArray | None, where: str) -> tuple[Any, PyTree]:
        out, grads = self.side.step(self.run, key, where, self.name)
        return out, self.gradients(grads)


class _LinenReference(_Reference):
    """A linen module and its variables, run by linen's own `apply` through
    `ToEquinox` (one calling convention and one mode switch for both sides)."""

    name, mapping = "linen", "as_linen"

    def __init__(
        self,
        module: nn.Module,
        variables: PyTree,
        trainable: tuple[str, ...],
        **options: Any,
    ):
        wrapped, state = eqx.nn.make_with_state(ToEquinox)(
            module, variables=variables, trainable=trainable, **options
        )
        super().__init__(wrapped, state)
        self.trainable = trainable
        self.collections = tuple(wrapped.linen_variables(state))

    def in_mode(self, inference: bool) -> PyTree:
        return eqx.nn.inference_mode(self.model, inference)

    def call(self, inference: bool) -> Callable[..., tuple[Any, PyTree]]:
        return _wrapper_call

    def gradients(self, grads: PyTree) -> PyTree:
        return grads.variables

    def variables(self) -> PyTree:
        return self.side.model.linen_variables(self.side.state)

    def select(self, tree: PyTree, trainable: bool) -> PyTree:
        return {
            c: tree.get(c)
            for c in self.collections
            if (c in self.trainable) == trainable
        }

    def step(self, key: PRNGKeyArray | None, where: str) -> tuple[Any, PyTree]:
        try:
            return super().step(key, where)
        except AdapterError as err:
            if key is None and "had no `key`" in str(err):
                raise TypeError(
                    f"{PREFIX}the linen module uses randomness in {self.mode} mode: "
                    "pass `key=` to `assert_equivalent`."
                ) from err
            raise


class _NNXReference(_Reference):
    """An initialised NNX module, run natively with NNX's functional API: split
    once into its trainable variables (the `model`), RNG streams and other
    variables (the `state`), merged again for every call."""

    name, mapping = "NNX", "as_nnx"

    def __init__(self, module: nnx.Module, trainable: Any, keyed: bool):
        try:
            if jtu.tree_leaves(nnx.state(module, nnx.Intermediate)):
                # Values sown in earlier calls are per call, not state (as for
                # `NNXToEquinox`): leave them out, on a copy of the user's module.
                module = nnx.clone(module)
                nnx.pop(module, nnx.Intermediate)
            # The States hold the module's own Variable objects: `_Side` copies
            # them, and every call merges copies, so the module is never changed.
            graphdef, params, rngs, rest = nnx.split(
                module, trainable, nnx.RngState, ...
            )
        except Exception as err:
            raise TypeError(
                PREFIX + _NOT_SPLITTABLE.format(name=type(module).__qualname__, err=err)
            ) from err
        super().__init__(params, (rngs, rest))
        self.graphdef, self.trainable, self.keyed = graphdef, trainable, keyed
        self.trainable_paths = frozenset(_flat(nnx.to_pure_dict(params), ""))
        self.rng_paths = frozenset(_flat(nnx.to_pure_dict(rngs), ""))

    def call(self, inference: bool) -> Callable[..., tuple[Any, PyTree]]:
        graphdef, trainable = self.graphdef, self.trainable

        def call(params, *args, key=None):
            *inputs, (rngs, rest) = args
            # Copies of the Variables: the call updates them in place.
            module = nnx.merge(graphdef, params, rngs, rest, copy=True)
            if inference:
                module.eval()
            if key is not None:
                nnx_reseed(module, key)
            out = module(*inputs)
            # Sown `nnx.Intermediate`s are per call, never state (as for
            # `NNXToEquinox`).
            _, _, new_rngs, _, new_rest = nnx.split(
                module, trainable, nnx.RngState, nnx.Intermediate, ...
            )
            # A keyed call leaves the stored streams as they were.
            return out, (rngs if key is not None else new_rngs, new_rest)

        return call

    def gradients(self, grads: PyTree) -> PyTree:
        return nnx.to_pure_dict(grads)

    def variables(self) -> PyTree:
        rngs, rest = self.side.state
        return _deep_merge(
            nnx.to_pure_dict(self.side.model),
            nnx.to_pure_dict(rngs),
            nnx.to_pure_dict(rest),
        )

    def select(self, tree: PyTree, trainable: bool) -> PyTree:
        def keep(path: str) -> bool:
            if trainable:
                return path in self.trainable_paths
            # With `key`, the streams are reseeded for each call and not stored.
            rng = self.keyed and path in self.rng_paths
            return path not in self.trainable_paths and not rng

        return jtu.tree_map_with_path(
            lambda path, x: x if keep(path_str(path)) else None, tree
        )


def _deep_merge(*trees: Any) -> dict:
    """Nested dicts merged into one: an NNX module's variables, trainable and not,
    in the layout of `nnx.to_pure_dict(nnx.state(module))`."""
    merged: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = _deep_merge(merged[k], v)
            else:
                merged[k] = v
    return merged


def _strong(x: Any) -> Any:
    if isinstance(x, jax.Array) and getattr(x, "weak_type", False):
        return jax.numpy.asarray(x, dtype=x.dtype)
    return x


def _wrapped_as_linen(model: ToEquinox, state: eqx.nn.State | None) -> PyTree:
    return model.linen_variables(state)  # pyright: ignore


def _wrapped_as_nnx(model: NNXToEquinox, state: eqx.nn.State | None) -> PyTree:
    rest = {} if state is None else state.get(model.state_index)
    return _deep_merge(model.variables, rest)


def _wrapper_call(model, *args, key=None):
    *args, state = args
    return model(*args, state, key=key)


def _default_call(model, *args, key=None):
    *inputs, state = args
    kwargs = {} if key is None else {"key": key}
    if state is None:
        return model(*inputs, **kwargs), None
    return model(*inputs, state, **kwargs)


def _make_step(
    call: Callable,
    inputs: tuple[Any, ...],
    loss: Callable[[Any], jax.Array],
    optimizer: Any | None,
    jit: bool,
) -> Callable:
    def forward(model, state, key):
        out, state = call(model, *inputs, state, key=key)
        return loss(out), (out, state)

    def step(model, state, key, opt_state):
        grad_fn = eqx.filter_value_and_grad(forward, has_aux=True)
        (_, (out, state)), grads = grad_fn(model, state, key)
        if optimizer is not None:
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            model = eqx.apply_updates(model, updates)
        return out, state, grads, model, opt_state

    if jit:
        return eqx.filter_jit(eqx.debug.assert_max_traces(step, max_traces=1))
    return step
