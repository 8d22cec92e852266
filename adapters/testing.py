"""Assertions for your own test suite: does an Equinox model compute what a linen
model computes?

`assert_equivalent` runs both models on the same inputs and keys, in training and in
inference mode, and compares outputs, state updates, gradients of a loss with
respect to the trainable arrays, and (optionally) several optimiser steps. Like
chex's assertions it raises an `AssertionError` with one prefix,
`[adapters.testing]`, whose message names the check that failed, the first
differing leaf by its linen path and its Equinox path, and the errors.
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
from jaxtyping import PRNGKeyArray, PyTree

from ._errors import AdapterError
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
    as_linen: Callable, model: PyTree, state: Any, name: str
) -> Callable[[str], list[str]]:
    """For a leaf that `as_linen` computes, the paths of the model's arrays it is
    computed from: found by tracing `as_linen` to a jaxpr and walking back from
    that leaf to the inputs it depends on. Runs only when a check fails."""

    def find(linen_path: str) -> list[str]:
        arrays, static = eqx.partition(model, eqx.is_array)
        flat, _ = jtu.tree_flatten_with_path(arrays)

        def leaf(arrays):
            return _flat(as_linen(eqx.combine(arrays, static), state), "")[linen_path]

        try:
            jaxpr = jax.make_jaxpr(leaf)(arrays).jaxpr
        except Exception:  # an `as_linen` that cannot be traced: no names
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
    def __init__(self, rtol: float, atol: float):
        self.rtol, self.atol = rtol, atol
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
        linen: PyTree,
        equinox: PyTree,
        equinox_paths: dict[int, str] | None = None,
        sources: Callable[[str], list[str]] | None = None,
    ) -> None:
        """`linen` is the reference, `equinox` the candidate, both in linen's
        layout; `equinox_paths` names the candidate's leaves in the Equinox model,
        and `sources(path)` the Equinox arrays that a leaf `as_linen` computed
        (e.g. a transposed kernel) is made from."""
        root = "output" if check == "output" else ""
        expected, got = _flat(linen, root), _flat(equinox, root)
        missing = [p for p in expected if p not in got]
        extra = [p for p in got if p not in expected]
        if missing or extra:
            self.fail(
                check,
                where,
                f"in structure: linen paths missing on the Equinox side: {missing}; "
                f"Equinox paths that linen does not have: {extra}.",
            )
        for path, want in expected.items():
            have = got[path]
            name = f"at {path!r}" if check == "output" else f"at linen path {path!r}"
            if equinox_paths is not None and id(have) in equinox_paths:
                name += f" (Equinox path {equinox_paths[id(have)]})"
            elif sources is not None:
                found = sources(path)
                if found:
                    name += f" (computed by `as_linen` from {', '.join(found)})"
            if np.shape(want) != np.shape(have) or _dtype(want) != _dtype(have):
                self.fail(
                    check,
                    where,
                    f"{name}: linen {_describe(want)}, Equinox {_describe(have)}.",
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
            f"the first{at}: linen {a[index].tolist()!r}, Equinox "
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
                side = "Equinox" if only_b.any() else "linen"
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
            reference = (a != 0) & np.isfinite(a)  # relative to linen's non-zeros
            relative = error[reference] / np.abs(a[reference])
        rel = f"{np.max(relative):.3g}" if relative.size else "n/a (all 0)"
        moduli = "; errors are moduli of complex differences" if is_complex else ""
        return (
            f"max abs error {np.max(error):.3g}, max rel error {rel} "
            f"(rtol={self.rtol}, atol={self.atol}{moduli})."
        )


def assert_equivalent(
    linen_module: nn.Module,
    variables: PyTree,
    model: PyTree,
    state: eqx.nn.State | None,
    *inputs: Any,
    key: PRNGKeyArray | None = None,
    as_linen: Callable[[PyTree, eqx.nn.State | None], PyTree] | None = None,
    call: Callable[..., tuple[Any, eqx.nn.State | None]] | None = None,
    train_kwarg: str | Sequence[str] | None = None,
    deterministic_kwarg: str | Sequence[str] | None = None,
    rng_streams: str | Sequence[str] = ("dropout",),
    trainable: str | Sequence[str] = ("params",),
    loss: Callable[[Any], jax.Array] | None = None,
    modes: Sequence[str] = ("train", "inference"),
    optimizer: Any | None = None,
    steps: int = 2,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    jit: bool = True,
) -> None:
    """Asserts that an Equinox model (and its state) computes what a linen module
    (and its variables) computes.

    For each mode in `modes` (`"train"`, then `"inference"` through
    `eqx.nn.inference_mode`), both models are run `steps` times on `inputs` with the
    same keys, threading their state, and compared at every step on:

    - **output**: the outputs of the two calls;
    - **state**: the updated non-trainable collections (`batch_stats`, `cache`, ...);
    - **gradient**: the gradients of `loss(output)` with respect to the trainable
        collections;
    - **parameters**: with an `optimizer` (an optax `GradientTransformation`), the
        trainable collections after each update.

    The linen side is linen's own `apply`, run through [`adapters.ToEquinox`][]
    (tested equal to it). The Equinox side is put into linen's layout with
    `as_linen(model, state)`, so leaves are matched by their linen path. With
    `jit=True` each side's step is compiled once with `eqx.filter_jit`, and a
    retrace across steps fails the assertion.

    !!! Example

        ```python
        adapters.testing.assert_equivalent(
            Net(), variables, eqx_model, state, x,
            key=jax.random.key(0), train_kwarg="train",
            as_linen=my_converter, optimizer=optax.adam(1e-3), steps=3,
        )
        ```

    **Arguments:**

    - `linen_module`, `variables`: the linen reference.
    - `model`, `state`: the Equinox candidate (`state=None` if stateless).
    - `*inputs`: positional inputs, the same for both sides.
    - `key`: a JAX key; step `k` uses `jax.random.fold_in(key, k)`, split for the
        linen side by [`adapters.linen_rngs`][] and given to the Equinox call as
        `key=`.
    - `as_linen`: `(model, state) -> linen variables`, placing the Equinox arrays in
        linen's layout; it is also applied to the gradients (a pytree shaped like
        the model). Default: `model.linen_variables(state)` for a
        [`adapters.ToEquinox`][].
    - `call`: `(model, *inputs, state, key=...) -> (out, state)`, how to call the
        Equinox model (e.g. with `jax.vmap` for a per-example model). Default:
        `model(*inputs, state, key=key)` (without `state` when `None`, without
        `key` when `None`).
    - `train_kwarg`, `deterministic_kwarg`, `rng_streams`, `trainable`: how to call
        the linen module, as for [`adapters.to_equinox`][].
    - `loss`: a scalar function of the output; default: the sum of the mean squares
        of the output's floating-point leaves.
    - `modes`: which of `"train"` and `"inference"` to check.
    - `optimizer`, `steps`: an optax optimiser applied on both sides after each
        step, and the number of steps (at least 2 with `jit`, so that a retrace
        shows).
    - `rtol`, `atol`: tolerances, as in `numpy.allclose`. The defaults suit float32.
        Dtypes must match exactly: compare a bfloat16 port with a bfloat16 linen
        model (`param_dtype`/`dtype`), with about `rtol=atol=1e-2`. A port that
        reorders reductions (a transposed matmul, another attention layout) may
        need `rtol=1e-4` in float32.
    - `jit`: compile each side's step with `eqx.filter_jit` (default), or run it
        eagerly.

    **Raises:**

    `AssertionError` (prefixed `[adapters.testing]`) naming the check (output,
    state, gradient or parameters), the mode and step, the first differing leaf by
    linen path and Equinox path (for a leaf that `as_linen` computes, e.g. a
    transposed kernel, the Equinox arrays it is computed from), and the max
    absolute and relative errors, or where a NaN appears on one side only; also
    when a jitted step retraces.
    `TypeError` if the model's layout cannot be matched without `as_linen`.
    """
    for mode in modes:
        if mode not in ("train", "inference"):
            raise ValueError(
                f"{PREFIX}`modes` holds {mode!r}; use 'train' and/or 'inference'."
            )
    if as_linen is None:
        if not isinstance(model, ToEquinox):
            raise TypeError(PREFIX + _NO_AS_LINEN)
        as_linen = _wrapped_as_linen
    if call is None:
        call = _default_call
    loss_fn = _default_loss if loss is None else loss
    trainable = normalise_names(trainable, "trainable")
    reference, reference_state = eqx.nn.make_with_state(ToEquinox)(
        linen_module,
        variables=variables,
        trainable=trainable,
        rng_streams=rng_streams,
        train_kwarg=train_kwarg,
        deterministic_kwarg=deterministic_kwarg,
    )
    steps = max(steps, 2) if jit else max(steps, 1)
    checker = _Checker(rtol, atol)

    def ref_call(m, *args, key=None):
        *args, s = args
        return m(*args, s, key=key)

    for mode in modes:
        inference = mode == "inference"
        ref_step = _make_step(ref_call, inputs, loss_fn, optimizer, jit)
        eqx_step = _make_step(call, inputs, loss_fn, optimizer, jit)
        ref = _Side(eqx.nn.inference_mode(reference, inference), reference_state)
        cand = _Side(eqx.nn.inference_mode(model, inference), state)
        for side in (ref, cand):
            side.opt_state = (
                None
                if optimizer is None
                else optimizer.init(eqx.filter(side.model, eqx.is_inexact_array))
            )
        for k in range(steps):
            where = f"{mode} mode, step {k}"
            step_key = None if key is None else jax.random.fold_in(key, k)
            try:
                ref_out, ref_grads = ref.step(ref_step, step_key, where, "linen")
            except AdapterError as err:
                if key is None and "had no `key`" in str(err):
                    raise TypeError(
                        f"{PREFIX}the linen module uses randomness in {mode} mode: "
                        "pass `key=` to `assert_equivalent`."
                    ) from err
                raise
            out, grads = cand.step(eqx_step, step_key, where, "Equinox")
            if mode == "train" and key is not None:
                checker.note = (
                    " (In train mode both sides draw random numbers: if the Equinox "
                    "model draws its own, e.g. its own dropout masks, it cannot match "
                    "linen's; compare with `modes=('inference',)`.)"
                )
            else:
                checker.note = ""
            checker.trees("output", where, ref_out, out)

            ref_vars = ref.model.linen_variables(ref.state)
            cand_vars = as_linen(cand.model, cand.state)
            cand_paths = _equinox_paths(cand.model, cand.state)
            non_trainable = {c: t for c, t in ref_vars.items() if c not in trainable}
            cand_sources = _sources(as_linen, cand.model, cand.state, "model")
            checker.trees(
                "state",
                where,
                non_trainable,
                {c: cand_vars.get(c) for c in non_trainable},
                cand_paths,
                cand_sources,
            )
            grad_vars = as_linen(grads, cand.state)
            checker.trees(
                "gradient",
                where,
                {c: ref_grads.variables[c] for c in ref_grads.variables},
                {c: grad_vars.get(c) for c in ref_grads.variables},
                _equinox_paths(grads, name="grads"),
                _sources(as_linen, grads, cand.state, "grads"),
            )
            if optimizer is not None:
                checker.trees(
                    "parameters",
                    f"{where}, after the optimiser update",
                    {c: ref_vars[c] for c in trainable if c in ref_vars},
                    {c: cand_vars.get(c) for c in trainable if c in ref_vars},
                    cand_paths,
                    cand_sources,
                )


class _Side:
    """One side of the comparison: a model, its state and optimiser state."""

    def __init__(self, model: PyTree, state: eqx.nn.State | None):
        # A State of our own (the same arrays): an eager call consumes the State it
        # is given, and the caller's must stay usable.
        leaves, treedef = jtu.tree_flatten(state)
        self.state = jtu.tree_unflatten(treedef, leaves)
        # Weakly typed arrays (from Python scalars) become strongly typed after
        # the first update, which would retrace the step: start strong.
        self.model = jtu.tree_map(_strong, model)
        self.opt_state = None

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


def _strong(x: Any) -> Any:
    if isinstance(x, jax.Array) and getattr(x, "weak_type", False):
        return jax.numpy.asarray(x, dtype=x.dtype)
    return x


def _wrapped_as_linen(model: ToEquinox, state: eqx.nn.State | None) -> PyTree:
    return model.linen_variables(state)  # pyright: ignore


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
