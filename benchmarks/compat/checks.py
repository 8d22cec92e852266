"""The checks of the compatibility matrix: a real package's model, wrapped by the
adapters, against the same model run natively on the same variables.

For a linen model (`linen_row`): forward in training (dropout keys through
`adapters.linen_rngs`) and in inference, the gradient of a loss of every float
output, a few Adam steps, and the state collections a training call updates; for a
model with a decode cache, greedy decoding token by token (`decode_check`). For an
Equinox model inside linen (`equinox_row`): the same against native Equinox.

Each check gives the largest absolute difference between the two sides; it passes
when that is at most `TOLERANCE` (and, for decoding, when the tokens are equal).
Both sides of a check run inside one `jax.jit`, so each model compiles once per
check group.
"""

import dataclasses
import functools
import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adapters


TOLERANCE = 1e-5
STEPS = 3
# The check programs compile with LLVM's cheap settings: the matrix compiles one
# program a model, and both sides of a comparison compile alike (a quarter less
# compile time here). The decoding steps keep the process's settings (XLA's
# defaults when the matrix script runs; the suite's cheap ones under pytest).
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
CHECKS = ("forward", "gradient", "optimiser", "state", "decode", "key")


@dataclasses.dataclass
class Check:
    ok: bool
    max_diff: float | None  # None where the check failed before comparing
    detail: str = ""


@dataclasses.dataclass
class Row:
    """One line of the matrix."""

    id: str  # "transformers/bert"
    package: str
    version: str
    model: str  # the class wrapped
    exercises: list[str]
    checks: dict[str, Check]  # only the checks that apply
    note: str = ""
    unsupported: str = ""  # the AdapterError a model that cannot be wrapped gets

    def passed(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Row":
        checks = {k: Check(**v) for k, v in data["checks"].items()}
        return cls(**{**data, "checks": checks})


def installed(distribution: str) -> Callable[[], str]:
    """A row's `version`: the installed version of the package, read when the row
    runs."""
    return lambda: importlib.metadata.version(distribution)


def max_abs_diff(a, b) -> float:
    """The largest |a - b| over two pytrees of the same structure (float leaves;
    integer leaves must be equal, else inf). Non-finite entries must be the same
    on both sides (NaN where NaN, the same infinity); the largest difference is
    over the finite ones."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf")
        if not np.issubdtype(x.dtype, np.inexact):
            if not np.array_equal(x, y):
                return float("inf")
            continue
        finite = np.isfinite(x)
        if not np.array_equal(finite, np.isfinite(y)):
            return float("inf")
        if not np.array_equal(x[~finite], y[~finite], equal_nan=True):
            return float("inf")
        if finite.any():
            wide = np.complex128 if np.iscomplexobj(x) else np.float64
            d = np.max(np.abs(x[finite].astype(wide) - y[finite].astype(wide)))
            worst = max(worst, float(d))
    return worst


def compares_something(tree) -> bool:
    """Whether a native result has a finite, non-zero float entry: a comparison
    of empty trees, of zeros with zeros (the gradient of a model whose outputs are
    all integers) or of NaN with NaN compares nothing."""
    return any(
        np.any(np.isfinite(x) & (x != 0))
        for x in map(np.asarray, jax.tree.leaves(tree))
        if np.issubdtype(x.dtype, np.inexact)
    )


def nonzero_gradient(grad, check: Check) -> Check:
    """A gradient check compares something (see `compares_something`)."""
    if not compares_something(grad):
        return Check(False, check.max_diff, "the native gradient is all zero")
    return check


def check_of(diff: float, detail: str = "") -> Check:
    return Check(bool(diff <= TOLERANCE), diff, detail)


def failed(err: BaseException) -> Check:
    """A check that raised: the error's type and first line (JAX appends notes
    about its filtered traceback after the message)."""
    first = f"{type(err).__name__}: {err}".splitlines()[0]
    return Check(False, None, first[:300])


def float_loss(out) -> jax.Array:
    """A scalar of every float array in a model's output (any pytree)."""
    leaves = [
        leaf
        for leaf in jax.tree.leaves(out)
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    # |z|^2 of complex outputs (netket's wave functions), not their real parts.
    return sum(jnp.mean(jnp.abs(leaf).astype(jnp.float32) ** 2) for leaf in leaves)


def first_step(trace):
    """The first step's entry of a `jax.lax.scan`'s stacked outputs."""
    return jax.tree.map(lambda x: x[0], trace)


def optax_standard():
    # optax's Adam computes `decay ** count` with an int32 count, which a strict
    # dtype promotion refuses; both sides alike run it under standard promotion.
    return jax.numpy_dtype_promotion("standard")


# ---------------------------------------------------------------------------------
# Linen models inside Equinox.


@dataclasses.dataclass
class LinenCase:
    """A linen module, its call, and how its mode keyword works.

    `args`/`kwargs` are the call's inputs (the first call's for decoding);
    `mode` names the keyword that switches dropout and friends: ("deterministic",
    True) means `deterministic=True` in inference, ("train", False) means
    `train=False` in inference. `streams` are the rng streams a training call
    draws. `init_kwargs` go to init only (e.g. `init_cache=True`).
    """

    module: nn.Module
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    mode: tuple[str, bool] | None = ("deterministic", True)
    streams: tuple[str, ...] = ("dropout",)
    init_kwargs: dict = dataclasses.field(default_factory=dict)
    init_streams: tuple[str, ...] = ("params", "dropout")
    method: Any = None
    # Collections a training call may update (others are read only, e.g. a cache).
    mutable: tuple[str, ...] = ()


def init_rngs(key, streams):
    return dict(zip(streams, jax.random.split(key, len(streams))))


def _mode_kwargs(case: LinenCase, inference: bool) -> dict:
    if case.mode is None:
        return {}
    name, inference_value = case.mode
    return {name: inference_value if inference else not inference_value}


def wrap(case: LinenCase, variables):
    mode = {}
    if case.mode is not None:
        name, inference_value = case.mode
        mode = {"deterministic_kwarg" if inference_value else "train_kwarg": name}
    # No example arguments: the variables are linen's own init's (checking them
    # against another init would only cost a trace).
    return adapters.to_equinox(
        case.module,
        variables=variables,
        rng_streams=case.streams,
        init_method=case.method,
        **mode,
    )


def linen_checks(case: LinenCase, key) -> tuple[dict[str, Check], Any]:
    """forward, gradient, optimiser (and state, if a training call updates one),
    all from one jitted program running both sides: `STEPS` Adam steps of each,
    whose first step gives the training forward pass, its state updates and the
    gradient, plus one inference forward pass."""
    init_key, call_key = jax.random.split(key)

    def init(rngs):
        return case.module.init(
            rngs,
            *case.args,
            method=case.method,
            **case.kwargs,
            **case.init_kwargs,
            **_mode_kwargs(case, inference=True),
        )

    init = jax.jit(init, compiler_options=FAST_COMPILE)
    variables = dict(init(init_rngs(init_key, case.init_streams)))
    model, state = wrap(case, variables)
    params = variables["params"]
    rest = {c: v for c, v in variables.items() if c != "params"}
    mutable = list(case.mutable)
    if missing := [c for c in mutable if c not in rest]:
        raise ValueError(f"the case's mutable {missing} are not in init's variables")
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(1e-3)

    def native(params, rest, key, inference):
        train = mutable and not inference
        out = case.module.apply(
            {"params": params, **rest},
            *case.args,
            rngs=adapters.linen_rngs(key, case.streams),
            method=case.method,
            mutable=mutable if train else False,
            **case.kwargs,
            **_mode_kwargs(case, inference),
        )
        return out if train else (out, {})

    def wrapped(arrays, state, key, inference):
        m = eqx.nn.inference_mode(eqx.combine(arrays, static), inference)
        return m(*case.args, state, key=key, method=case.method, **case.kwargs)

    def native_loss(params, rest, key):
        out, updates = native(params, rest, key, False)
        return float_loss(out), (out, updates)

    def wrapped_loss(arrays, state, key):
        out, state = wrapped(arrays, state, key, False)
        return float_loss(out), (out, state)

    def n_step(carry, k):
        # The state a training call updates goes on to the next step, as the
        # wrapper's state does.
        p, r, o = carry
        g, (out, updates) = jax.grad(native_loss, has_aux=True)(p, r, k)
        with optax_standard():
            u, o = optim.update(g, o, p)
        return (optax.apply_updates(p, u), {**r, **updates}, o), (g, out, updates)

    def w_step(carry, k):
        a, s, o = carry
        g, (out, new_s) = jax.grad(wrapped_loss, has_aux=True)(a, s, k)
        with optax_standard():
            u, o = optim.update(g, o, a)
        return (eqx.apply_updates(a, u), new_s, o), (g, out, new_s)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def program(params, arrays, state, key):
        keys = jax.random.split(key, STEPS)
        with optax_standard():
            n_opt, w_opt = optim.init(params), optim.init(arrays)
        (n_params, n_rest, _), n_trace = jax.lax.scan(
            n_step, (params, rest, n_opt), keys
        )
        (w_arrays, w_last, _), w_trace = jax.lax.scan(
            w_step, (arrays, state, w_opt), keys
        )
        n_inf, _ = native(params, rest, key, True)
        w_inf, w_inf_state = wrapped(arrays, state, key, True)
        return (
            (n_params, n_rest, first_step(n_trace), n_inf),
            (w_arrays, w_last, first_step(w_trace), w_inf, w_inf_state),
        )

    native_out, wrapped_out = program(params, arrays, state, call_key)
    n_params, n_rest, (n_grad, n_train, n_updates), n_inf = native_out
    w_arrays, w_last, (w_grad, w_train, w_state), w_inf, w_inf_state = wrapped_out
    # In inference the wrapper leaves every state collection as it was, as linen's
    # apply(variables, x) does (which cannot write).
    untouched = max_abs_diff(rest, _held(model, w_inf_state, rest))
    forward = check_of(
        max(max_abs_diff(n_train, w_train), max_abs_diff(n_inf, w_inf), untouched),
        "" if untouched == 0 else "the state changed in inference",
    )
    if not compares_something((n_train, n_inf)):
        forward = Check(
            False, forward.max_diff, "the native output has no finite, non-zero value"
        )
    checks = {
        "forward": forward,
        "gradient": nonzero_gradient(
            n_grad, check_of(max_abs_diff(n_grad, w_grad.variables["params"]))
        ),
        "optimiser": check_of(max_abs_diff(n_params, w_arrays.variables["params"])),
    }
    if mutable:
        # The first step's updates, then the state after every step.
        diff = max(
            max_abs_diff(n_updates, _held(model, w_state, n_updates)),
            max_abs_diff(n_rest, _held(model, w_last, n_rest)),
        )
        checks["state"] = check_of(diff)
        if max_abs_diff(n_updates, {c: rest[c] for c in n_updates}) == 0:
            checks["state"] = Check(False, diff, "the state did not change natively")
    return checks, (model, state, variables)


def _held(model, state, like: dict) -> dict:
    """The collections of `like`, as the wrapper's `state` holds them."""
    collections = model.linen_variables(state)
    return {c: collections[c] for c in like}


# ---------------------------------------------------------------------------------
# Greedy decoding with a cache.


@dataclasses.dataclass
class Decoding:
    """Greedy decoding with a decode cache, natively and through the wrapper, set
    up by a case from the checked model's parameters.

    `native_step(variables, tokens, t) -> (logits, variables)` runs linen's `apply`
    with the cache mutable; `wrapped_step(model, state, tokens, t) -> (logits,
    state)` calls the wrapper. `tokens` is (batch, 1) int32, `t` the position;
    the logits are those of that position, (batch, vocab).
    """

    variables: Any  # native: params and the initial cache
    model: Any  # wrapped, holding the same params
    state: Any  # wrapped: the same initial cache
    native_step: Callable
    wrapped_step: Callable
    first: Any
    steps: int = 6
    # (native, wrapped) encoder outputs of an encoder-decoder, computed once on
    # each side before decoding; compared with the logits.
    encoded: Any = None


def decode_check(decoding: Decoding) -> Check:
    """Greedy decoding, token by token: native linen under `jax.jit` and the
    wrapper under `jax.lax.scan` in one program, and the wrapper one step at a time
    under `eqx.filter_jit`, as a decoding loop calls it. The tokens must be equal
    and the logits within TOLERANCE."""

    def greedy(logits):
        return jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)

    def scan(step, carry):
        def body(carry, t):
            tokens, cache = carry
            logits, cache = step(cache, tokens, t)
            return (greedy(logits), cache), (greedy(logits), logits)

        steps = jnp.arange(decoding.steps)
        return jax.lax.scan(body, (decoding.first, carry), steps)[1]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def scanned(variables, arrays, state):
        model = eqx.combine(arrays, static)
        native = scan(decoding.native_step, variables)
        wrapped = scan(lambda s, tok, t: decoding.wrapped_step(model, s, tok, t), state)
        return native, wrapped

    @eqx.filter_jit
    def wrapped_step(model, state, tokens, t):
        logits, state = decoding.wrapped_step(model, state, tokens, t)
        return greedy(logits), logits, state

    arrays, static = eqx.partition(decoding.model, eqx.is_array)
    native, in_scan = scanned(decoding.variables, arrays, decoding.state)
    tokens, state, stepped = decoding.first, decoding.state, ([], [])
    for t in range(decoding.steps):
        # A traced position: eqx.filter_jit would compile once per Python int.
        t = jnp.int32(t)
        tokens, logits, state = wrapped_step(decoding.model, state, tokens, t)
        stepped[0].append(tokens)
        stepped[1].append(logits)

    n_tokens = np.asarray(native[0])
    same = np.array_equal(n_tokens, np.asarray(in_scan[0])) and np.array_equal(
        n_tokens, np.stack(stepped[0])
    )
    diff = max(
        max_abs_diff(native[1], in_scan[1]),
        max_abs_diff(np.asarray(native[1]), np.stack(stepped[1])),
        0.0 if decoding.encoded is None else max_abs_diff(*decoding.encoded),
    )
    detail = f"{decoding.steps} tokens" + ("" if same else ", tokens differ")
    return Check(bool(same and diff <= TOLERANCE), diff, detail)


# ---------------------------------------------------------------------------------
# Rows.


@dataclasses.dataclass
class Spec:
    """A row to run: `make_case()` builds the model and its inputs (so that nothing
    is built at import), `decoding(case, params)` sets up cached decoding."""

    id: str
    package: str
    version: Callable[[], str]
    exercises: Sequence[str]
    make_case: Callable[[], Any]
    decoding: Callable[[Any, Any], Decoding] | None = None
    note: str = ""
    kind: str = "linen"  # or "equinox"


def run(spec: Spec) -> Row:
    if spec.kind == "equinox":
        from .equinox_checks import equinox_row

        return equinox_row(spec)
    return linen_row(spec)


def linen_row(spec: Spec, key=None) -> Row:
    """Runs every check of one linen model. An AdapterError at wrapping marks the
    model unsupported (the row keeps the message); another exception fails the
    check it happened in, with the error's last line, and not the others."""
    key = jax.random.key(0) if key is None else key
    case = spec.make_case()
    row = Row(
        spec.id,
        spec.package,
        spec.version(),
        type(case.module).__name__,
        list(spec.exercises),
        {},
        spec.note,
    )
    try:
        row.checks, (_, _, variables) = linen_checks(case, key)
    except adapters.AdapterError as err:
        row.checks = {"forward": failed(err)}
        row.unsupported = str(err).splitlines()[0]
        return row
    except Exception as err:  # a finding: the row says what failed
        row.checks = {"forward": failed(err)}
        return row
    if spec.decoding is not None:
        try:
            row.checks["decode"] = decode_check(
                spec.decoding(case, variables["params"])
            )
        except Exception as err:
            row.checks["decode"] = failed(err)
    return row
