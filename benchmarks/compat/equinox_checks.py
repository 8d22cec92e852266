"""The checks of the compatibility matrix for an Equinox model inside linen: the
model wrapped by `adapters.to_linen` (or built by a factory in
`adapters.ToLinen(make=...)`) and run through linen's `apply`, against the same
model run natively in Equinox on the same arrays.

Natively means as the adapters document it: with `vmap_axis`, the model is mapped
with `jax.vmap` over that axis of every positional input (named `axis_name`), its
state unmapped; a model that takes a key gets the key linen's `make_rng` draws for
the rng stream at the wrapper's (top-level) scope, split once per example under
`vmap_axis`. A factory's model is built natively from the key linen's `params`
stream gives the factory at init.

The checks: forward (training and inference, plus the factory's build and the
integer buffers), gradient (of a loss of every float output), optimiser (Adam
steps, the parameters compared by their path in the model), state (the updated
state collection against the native new state, for stateful models) and key (for
models that take one: a second key, and a call without the stream, which must be
refused). Both sides of each comparison run in one jitted program.
"""

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.tree_util as jtu
import optax
from flax import traverse_util

import adapters

from .checks import (
    Check,
    check_of,
    compares_something,
    failed,
    FAST_COMPILE,
    first_step,
    float_loss,
    max_abs_diff,
    nonzero_gradient,
    optax_standard,
    Row,
    STEPS,
)


@dataclasses.dataclass
class EquinoxCase:
    """An Equinox model and the batched inputs of its linen call.

    `make(key)` returns the model, or `(model, state)`. With `factory`, the wrapper
    is `ToLinen(make=make)` and builds the model at init from linen's `params`
    stream; otherwise `make` runs once and `to_linen(model, state)` wraps that
    model. `args` are the positional inputs (mapped over `vmap_axis`), `kwargs`
    the unmapped keywords; `needs_key` says that the model's call takes `key=`,
    which `ToLinen` draws from `stream`.
    """

    make: Callable[[Any], Any]
    name: str  # the package's class wrapped, for the row
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    factory: bool = False
    vmap_axis: int | None = None
    axis_name: Hashable | None = None
    needs_key: bool = False
    stream: str = "dropout"
    state_collection: str = "batch_stats"


class Method(eqx.Module):
    """Calls one method of a package's model (`ToLinen` calls its model): the
    positional inputs are passed by the names in `names`, or as they are."""

    model: Any
    method: str = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True, default=())

    def __call__(self, *args, **kwargs):
        if self.names:
            kwargs = {**dict(zip(self.names, args, strict=True)), **kwargs}
            args = ()
        return getattr(self.model, self.method)(*args, **kwargs)


class _StreamKey(nn.Module):
    stream: str

    @nn.compact
    def __call__(self):
        return self.make_rng(self.stream)


def stream_key(key, stream):
    """Linen's first `make_rng(stream)` at the top-level scope of an `apply` given
    `rngs={stream: key}`: the key a top-level `ToLinen` hands its model (and, for
    the `params` stream at init, its factory)."""
    return _StreamKey(stream).apply({}, rngs={stream: key})


def _model_and_state(made):
    if isinstance(made, tuple):
        return made
    return made, None


def _path(path) -> tuple[str, ...]:
    """A key path as the nested-dict keys a linen collection uses for it: each
    entry as JAX writes it simply (an attribute's name, an index, a dict key)."""
    return tuple(jtu.keystr((entry,), simple=True) for entry in path)


def by_path(tree, keep=eqx.is_inexact_array) -> dict[tuple[str, ...], Any]:
    """The leaves of an Equinox pytree that `keep` selects, by their path."""
    flat, _ = jtu.tree_flatten_with_path(eqx.filter(tree, keep))
    return {_path(p): leaf for p, leaf in flat}


def state_by_path(model, state) -> dict[tuple[str, ...], Any]:
    """The state's entries, by the path of their `StateIndex` in the model."""
    flat, _ = jtu.tree_flatten_with_path(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )
    return {
        _path(p): state.get(index)
        for p, index in flat
        if isinstance(index, eqx.nn.StateIndex)
    }


def flat(collection) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(nn.meta.unbox(collection))


def by_path_diff(native: dict, linen: dict) -> tuple[float, str]:
    """max_abs_diff of two path-keyed dicts, and which paths only one side has."""
    if native.keys() != linen.keys():
        only_n = sorted("/".join(p) for p in native.keys() - linen.keys())
        only_l = sorted("/".join(p) for p in linen.keys() - native.keys())
        return float("inf"), f"paths: only native {only_n[:3]}, only linen {only_l[:3]}"
    return max_abs_diff(native, {p: linen[p] for p in native}), ""


def _clone(state):
    # A native call consumes the state it is given (Equinox's guard against reuse).
    if state is None:
        return None
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def wrap(case: EquinoxCase, key):
    """The linen module and its variables, and the native model and state."""
    options = dict(
        vmap_axis=case.vmap_axis,
        axis_name=case.axis_name,
        rng_stream=case.stream,
        state_collection=case.state_collection,
    )
    if not case.factory:
        model, state = _model_and_state(case.make(key))
        module, variables = adapters.to_linen(model, _clone(state), **options)
        return module, dict(variables), model, state
    module = adapters.ToLinen(make=case.make, **options)
    params_key, call_key = jax.random.split(key)
    rngs = {"params": params_key}
    if case.needs_key:
        rngs[case.stream] = call_key
    init = jax.jit(
        functools.partial(module.init, inference=True), compiler_options=FAST_COMPILE
    )
    variables = init(rngs, *case.args, **case.kwargs)
    model, state = _model_and_state(case.make(stream_key(params_key, "params")))
    return module, dict(variables), model, state


def seat(model, variables, buffer_collection="constants"):
    """The native model holding the arrays of linen's `variables`, placed by their
    path in the model (a path linen lacks, or an array of another shape or dtype,
    keeps the native array: the build comparison reports it). A factory's model,
    built natively and by linen's init under `jax.jit`, may differ in the last
    bits, which Adam magnifies on parameters whose gradient is zero but for
    rounding (a bias before a normalisation)."""
    entries = {
        **flat(variables["params"]),
        **flat(variables.get(buffer_collection, {})),
    }

    def put(path, leaf):
        new = entries.get(_path(path))
        if (
            eqx.is_array(leaf)
            and new is not None
            and (new.shape, new.dtype) == (leaf.shape, leaf.dtype)
        ):
            return new
        return leaf

    return jtu.tree_map_with_path(put, model)


def equinox_checks(case: EquinoxCase, key) -> dict[str, Check]:
    init_key, call_key = jax.random.split(key)
    module, variables, built, state = wrap(case, init_key)
    model = seat(built, variables) if case.factory else built
    params = variables["params"]
    rest = {c: v for c, v in variables.items() if c != "params"}
    stateful = state is not None
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(1e-3)

    def linen(params, rest, key, inference):
        rngs = {case.stream: key} if case.needs_key else {}
        train = stateful and not inference
        out = module.apply(
            {"params": params, **rest},
            *case.args,
            inference=inference,
            rngs=rngs,
            mutable=[case.state_collection] if train else False,
            **case.kwargs,
        )
        if not train:
            return out, rest
        out, updates = out
        return out, {**rest, **updates}

    def native(arrays, state, key, inference):
        m = eqx.nn.inference_mode(eqx.combine(arrays, static), inference)
        k = stream_key(key, case.stream) if case.needs_key else None

        def call(args, k):
            kw = case.kwargs if k is None else {**case.kwargs, "key": k}
            if state is None:
                return m(*args, **kw), None
            return m(*args, _clone(state), **kw)

        if case.vmap_axis is None:
            return call(case.args, k)
        size = jax.tree.leaves(case.args)[0].shape[case.vmap_axis]
        keys = None if k is None else jax.random.split(k, size)
        return jax.vmap(
            call,
            in_axes=(case.vmap_axis, None if keys is None else 0),
            out_axes=(case.vmap_axis, None),
            axis_name=case.axis_name,
        )(case.args, keys)

    def l_step(carry, k):
        p, r, o = carry

        def loss(p):
            out, r2 = linen(p, r, k, False)
            return float_loss(out), (out, r2)

        g, (out, r2) = jax.grad(loss, has_aux=True)(p)
        with optax_standard():
            u, o = optim.update(g, o, p)
        return (optax.apply_updates(p, u), r2, o), (g, out, r2)

    def n_step(carry, k):
        a, s, o = carry

        def loss(a):
            out, s2 = native(a, s, k, False)
            return float_loss(out), (out, s2)

        g, (out, s2) = eqx.filter_grad(loss, has_aux=True)(a)
        with optax_standard():
            u, o = optim.update(g, o, a)
        return (eqx.apply_updates(a, u), s2, o), (g, out, s2)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def program(params, rest, arrays, state, key):
        keys = jax.random.split(key, STEPS + 1)
        with optax_standard():
            l_opt, n_opt = optim.init(params), optim.init(arrays)
        (l_params, _, _), l_trace = jax.lax.scan(
            l_step, (params, rest, l_opt), keys[1:]
        )
        (n_arrays, _, _), n_trace = jax.lax.scan(
            n_step, (arrays, _clone(state), n_opt), keys[1:]
        )
        l_inf, _ = linen(params, rest, keys[0], True)
        n_inf, _ = native(arrays, state, keys[0], True)
        l_other = n_other = None
        if case.needs_key:  # training mode with another key than the first step's
            l_other, _ = linen(params, rest, keys[0], False)
            n_other, _ = native(arrays, state, keys[0], False)
        return (
            (l_params, first_step(l_trace), l_inf, l_other),
            (n_arrays, first_step(n_trace), n_inf, n_other),
        )

    l_side, n_side = program(params, rest, arrays, state, call_key)
    l_params, (l_grad, l_train, l_rest), l_inf, l_other = l_side
    n_arrays, (n_grad, n_train, n_state), n_inf, n_other = n_side

    # The variables hold the native model's arrays (as built), by the same paths.
    build, build_detail = by_path_diff(by_path(built), flat(params))
    buffers, buffer_detail = by_path_diff(
        by_path(built, lambda x: eqx.is_array(x) and not eqx.is_inexact_array(x)),
        flat(rest.get("constants", {})),
    )
    initial, initial_detail = 0.0, ""
    if stateful:
        initial, initial_detail = by_path_diff(
            state_by_path(built, state), flat(rest[case.state_collection])
        )
    forward = max(
        build,
        buffers,
        initial,
        max_abs_diff(l_train, n_train),
        max_abs_diff(l_inf, n_inf),
    )
    forward_detail = "; ".join(
        d for d in (build_detail, buffer_detail, initial_detail) if d
    )
    gradient, gradient_detail = by_path_diff(by_path(n_grad), flat(l_grad))
    optimiser, optimiser_detail = by_path_diff(by_path(n_arrays), flat(l_params))
    checks = {
        "forward": check_of(forward, forward_detail),
        "gradient": nonzero_gradient(
            by_path(n_grad), check_of(gradient, gradient_detail)
        ),
        "optimiser": check_of(optimiser, optimiser_detail),
    }
    if not compares_something((n_train, n_inf)):
        checks["forward"] = Check(
            False, forward, "the native output has no finite, non-zero value"
        )
    if stateful:
        n_entries = state_by_path(model, n_state)
        l_entries = flat(l_rest[case.state_collection])
        diff, detail = by_path_diff(n_entries, l_entries)
        checks["state"] = check_of(diff, detail)
        if max_abs_diff(state_by_path(model, state), n_entries) == 0:
            checks["state"] = Check(False, diff, "the state did not change natively")
    if case.needs_key:
        checks["key"] = key_check(case, module, variables, l_other, l_train, n_other)
    return checks


def key_check(case, module, variables, l_other, l_train, n_other) -> Check:
    """A second key gives the native output for that key, and not the first key's;
    a training call without the stream is refused with an AdapterError."""
    diff = max_abs_diff(l_other, n_other)
    if max_abs_diff(l_other, l_train) == 0:
        return Check(False, diff, "two keys gave the same output: no key reached")
    try:
        jax.eval_shape(
            lambda v: module.apply(v, *case.args, inference=False, **case.kwargs),
            variables,
        )
    except adapters.AdapterError as err:
        if repr(case.stream) not in str(err):
            return Check(False, diff, f"the refusal names no stream: {err}"[:300])
    except Exception as err:
        return Check(
            False, diff, f"no stream: not an AdapterError: {failed(err).detail}"
        )
    else:
        return Check(False, diff, "a call without the rng stream was not refused")
    return check_of(diff, f"{case.stream!r} stream; a call without it is refused")


def equinox_row(spec, key=None) -> Row:
    """Runs every check of one Equinox model. An AdapterError marks the model
    unsupported (the row keeps the message); another exception fails the row's
    forward check with the error's last line."""
    key = jax.random.key(0) if key is None else key
    case = spec.make_case()
    row = Row(
        spec.id,
        spec.package,
        spec.version(),
        case.name,
        list(spec.exercises),
        {},
        spec.note,
    )
    try:
        row.checks = equinox_checks(case, key)
    except adapters.AdapterError as err:
        row.checks = {"forward": failed(err)}
        row.unsupported = str(err).splitlines()[0]
    except Exception as err:  # a finding: the row says what failed
        row.checks = {"forward": failed(err)}
    return row
