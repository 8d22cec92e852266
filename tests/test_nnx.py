"""`adapters.to_equinox` on Flax NNX modules: every behaviour against native NNX.

The native side always runs on `nnx.clone(module)`; the module handed to
`to_equinox` is never called, so that it can be checked to be untouched.
"""

import collections
import re

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from flax import nnx

import adapters


# ---------------------------------------------------------------------------
# The zoo: NNX modules, each with a maker of its inputs.


class Counter(nnx.Variable):
    """A user-defined variable type: state, not trainable."""


class Tracked(nnx.Module):
    """A module with custom `nnx.Variable`s updated on every call."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.calls = Counter(jnp.zeros((), jnp.int32))
        self.ema = Counter(jnp.zeros(4))

    def __call__(self, x):
        y = self.linear(x)
        self.calls[...] += 1
        self.ema[...] = 0.9 * self.ema[...] + 0.1 * y.mean(0)
        return y * self.calls[...] + self.ema[...]

    def decode(self, x, scale=1.0):
        self.calls[...] += 10
        return scale * self.linear(x) - self.ema[...]


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dropout(0.5, deterministic=not train)(x)


class Bridged(nnx.Module):
    """A linen module (params, batch_stats, dropout) inside NNX via `ToNNX`."""

    def __init__(self, rngs):
        self.inner = nnx.bridge.ToNNX(LinenBlock(), rngs=rngs)
        nnx.bridge.lazy_init(self.inner, jnp.ones((2, 3)), train=False)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.inner(x, train=True, mutable=True))


def _mha():
    mha = nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=8, decode=True, rngs=nnx.Rngs(0)
    )
    mha.init_cache((2, 12, 4))
    return mha


CASES = {
    "linear": (lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)), (2, 3)),
    "conv": (
        lambda: nnx.Conv(2, 3, kernel_size=(3, 3), rngs=nnx.Rngs(0)),
        (2, 5, 5, 2),
    ),
    "batchnorm": (lambda: nnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0)), (6, 3)),
    "dropout": (lambda: nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)), (4, 3)),
    "linear_dropout": (
        lambda: nnx.Sequential(
            nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
            nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)),
        ),
        (4, 3),
    ),
    "mha_decode": (_mha, (2, 1, 4)),
    "layernorm": (lambda: nnx.LayerNorm(3, rngs=nnx.Rngs(0)), (2, 3)),
    "custom_variable": (lambda: Tracked(nnx.Rngs(0)), (2, 3)),
    "linen_bridge": (lambda: Bridged(nnx.Rngs(params=0, dropout=1)), (5, 3)),
}
NAMES = list(CASES)


def _make(name):
    factory, shape = CASES[name]
    return factory(), lambda i: jr.normal(jr.key(100 + i), shape)


# ---------------------------------------------------------------------------
# Helpers: native NNX views and exact comparisons.


def _no_keys(tree):
    """Typed PRNG keys as their raw data, so that chex can compare them."""

    def f(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.key_data(x)
        return x

    return jax.tree.map(f, tree)


def _assert_equal(a, b):
    chex.assert_trees_all_equal(_no_keys(a), _no_keys(b), strict=True)


def _assert_same_arrays(a, b):
    """Not only equal: the very same array objects, path by path."""
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert all(x is y for (_, x), (_, y) in zip(flat_a, flat_b))


def _native_params(module, trainable=nnx.Param):
    return nnx.to_pure_dict(nnx.state(module, trainable))


def _native_rest(module, trainable=nnx.Param):
    """Every non-trainable variable of a native module but its intermediates."""
    _, _, _, rest = nnx.split(module, trainable, nnx.Intermediate, ...)
    return nnx.to_pure_dict(rest)


def _wrapped_rest(model, state):
    return state.get(model.state_index)


def _snapshot(module):
    """The very arrays (and graph) of a module, to check it is never mutated."""
    graphdef, state = nnx.split(module)
    return graphdef, jax.tree.leaves(state)


def _assert_untouched(module, snapshot):
    graphdef, leaves = _snapshot(module)
    assert graphdef == snapshot[0]
    assert len(leaves) == len(snapshot[1])
    assert all(a is b for a, b in zip(leaves, snapshot[1]))


def _loss_native(module, x):
    return jnp.mean(module(x) ** 2)


def _loss_wrapped(model, state, x):
    out, state = model(x, state)
    return jnp.mean(out**2), state


# ---------------------------------------------------------------------------
# Calls, state, round trip.


@pytest.mark.parametrize("name", NAMES)
def test_calls_and_state_match_native(name):
    module, inputs = _make(name)
    snapshot = _snapshot(module)
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    assert isinstance(model, adapters.NNXToEquinox)
    _assert_equal(model.variables, _native_params(native))
    _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    for i in range(3):
        out, state = model(inputs(i), state)
        _assert_equal(out, native(inputs(i)))
        _assert_equal(_wrapped_rest(model, state), _native_rest(native))
        _assert_equal(model.variables, _native_params(native))
    # The whole module, as NNX sees it, is the native one.
    again = model.nnx_module(state)
    assert type(again) is type(module)
    assert again is not module
    _assert_equal(
        nnx.to_pure_dict(nnx.state(again)), nnx.to_pure_dict(nnx.state(native))
    )
    assert nnx.graphdef(again) == nnx.graphdef(native)
    _assert_untouched(module, snapshot)


def test_to_equinox_is_make_with_state():
    module = Tracked(nnx.Rngs(0))
    model1, state1 = adapters.to_equinox(module)
    model2, state2 = eqx.nn.make_with_state(adapters.NNXToEquinox)(module)
    assert type(model1) is type(model2) is adapters.NNXToEquinox
    assert model1.state_index.marker == model2.state_index.marker
    _assert_equal(model1.variables, model2.variables)
    _assert_equal(state1, state2)


def test_equal_modules_give_equal_structures_and_no_retrace():
    module = Tracked(nnx.Rngs(0))
    x = jnp.ones((2, 3))
    native_traces = []
    native_call = nnx.jit(lambda m, x: (native_traces.append(None), m(x))[1])
    native_call(nnx.clone(module), x)
    native_call(nnx.clone(module), x)
    assert len(native_traces) == 1  # nnx.jit caches on the graph definition

    model1, state = adapters.to_equinox(module)
    model2, _ = adapters.to_equinox(nnx.clone(module))
    traces = []
    call = eqx.filter_jit(lambda m, s, x: (traces.append(None), m(x, s))[1])
    call(model1, state, x)
    call(model2, state, x)
    assert len(traces) == len(native_traces)
    assert jax.tree.structure(model1) == jax.tree.structure(model2)


@pytest.mark.parametrize("name", NAMES)
def test_nnx_module_round_trip(name):
    module, inputs = _make(name)
    snapshot = _snapshot(module)
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    out, state = model(inputs(0), state)
    native(inputs(0))

    again = model.nnx_module(state)
    # Bit-exact, and the very arrays of the model and its state (no copy).
    graphdef, params, rest = nnx.split(again, nnx.Param, ...)
    assert graphdef == nnx.graphdef(native)
    _assert_equal(nnx.to_pure_dict(params), model.variables)
    _assert_equal(nnx.to_pure_dict(rest), _wrapped_rest(model, state))
    _assert_same_arrays(nnx.to_pure_dict(params), model.variables)
    _assert_same_arrays(nnx.to_pure_dict(rest), _wrapped_rest(model, state))
    # ... and back again: the same model, computing the same as native NNX.
    model2, state2 = adapters.to_equinox(again)
    _assert_equal(model2.variables, model.variables)
    _assert_equal(state2.get(model2.state_index), _wrapped_rest(model, state))
    out1, state = model(inputs(1), state)
    out2, state2 = model2(inputs(1), state2)
    _assert_equal(out1, native(inputs(1)))
    _assert_equal(out2, out1)
    _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    _assert_equal(state2.get(model2.state_index), _native_rest(native))
    # The new module is an ordinary NNX module: calling it natively continues
    # exactly where the Equinox model is, and touches neither model nor module.
    _assert_equal(again(inputs(1)), out1)
    _assert_equal(model2.variables, model.variables)
    _assert_untouched(module, snapshot)


class Larger(eqx.Module):
    """Two NNX modules and an Equinox layer in one Equinox model."""

    first: adapters.NNXToEquinox
    second: adapters.NNXToEquinox
    head: eqx.nn.Linear

    def __init__(self, first, second):
        self.first = adapters.NNXToEquinox(first)
        self.second = adapters.NNXToEquinox(second)
        self.head = eqx.nn.Linear(4, 2, key=jr.key(0))

    def __call__(self, x, state):
        x, state = self.first(x, state)
        x, state = self.second(x, state)
        return jax.vmap(self.head)(x), state


def test_inside_a_larger_equinox_model():
    first = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(1))
    )
    second = nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    model, state = eqx.nn.make_with_state(Larger)(first, second)
    native = nnx.clone(nnx.Sequential(first, second))
    x = jr.normal(jr.key(0), (5, 3))
    for _ in range(2):
        out, state = model(x, state)
        _assert_equal(out, jax.vmap(model.head)(native(x)))
    rest_n = _native_rest(native)["layers"]
    _assert_equal(state.get(model.first.state_index), rest_n[0])
    _assert_equal(state.get(model.second.state_index), rest_n[1])


def test_nnx_module_after_training_is_nnx_trainable():
    module = Tracked(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    x = jr.normal(jr.key(0), (2, 3))
    _, state = model(x, state)
    again = model.nnx_module(state)
    native = nnx.clone(module)
    native(x)
    # NNX's own optimizer takes over on the returned module.
    for m in (again, native):
        opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
        grads = nnx.grad(_loss_native)(m, x)
        opt.update(m, grads)
    _assert_equal(
        nnx.to_pure_dict(nnx.state(again)), nnx.to_pure_dict(nnx.state(native))
    )


# ---------------------------------------------------------------------------
# Training: gradients and an optax trajectory against nnx.Optimizer.


@pytest.mark.parametrize("name", NAMES)
def test_optax_trajectory_matches_nnx_optimizer(name):
    module, inputs = _make(name)
    snapshot = _snapshot(module)
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)

    tx = optax.adam(1e-2)
    optimizer = nnx.Optimizer(native, tx, wrt=nnx.Param)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    for i in range(3):
        x = inputs(i)
        loss_n, grads_n = nnx.value_and_grad(_loss_native)(native, x)
        optimizer.update(native, grads_n)

        (loss, state), grads = eqx.filter_value_and_grad(_loss_wrapped, has_aux=True)(
            model, state, x
        )
        updates, opt_state = tx.update(
            grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
        )
        model = eqx.apply_updates(model, updates)

        _assert_equal(loss, loss_n)
        _assert_equal(grads.variables, nnx.to_pure_dict(grads_n))
        _assert_equal(model.variables, _native_params(native))
        _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    _assert_equal(
        nnx.to_pure_dict(nnx.state(model.nnx_module(state))),
        nnx.to_pure_dict(nnx.state(native)),
    )
    _assert_untouched(module, snapshot)


def test_custom_variable_can_be_trainable():
    """`trainable=` is an NNX filter: grads w.r.t. (Param, Counter) as nnx.grad's,
    with a float custom variable."""

    class Scaled(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)
            self.scale = Counter(jnp.full((2,), 2.0))
            self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls[...] += 1
            return self.linear(x) * self.scale[...]

    module = Scaled(nnx.Rngs(0))
    native = nnx.clone(module)
    trainable = (nnx.Param, Counter)
    model, state = adapters.to_equinox(module, trainable=trainable)
    assert set(model.variables) == {"linear", "scale"}
    x = jr.normal(jr.key(0), (4, 3))
    grads_n = nnx.grad(_loss_native, argnums=nnx.DiffState(0, trainable))(native, x)
    grads, state = eqx.filter_grad(_loss_wrapped, has_aux=True)(model, state, x)
    _assert_equal(grads.variables, nnx.to_pure_dict(grads_n))
    _assert_equal(model.variables, _native_params(native, trainable))
    _assert_equal(_wrapped_rest(model, state), _native_rest(native, trainable))


# ---------------------------------------------------------------------------
# Inference mode.


@pytest.mark.parametrize("name", NAMES)
def test_inference_mode_is_eval(name):
    module, inputs = _make(name)
    snapshot = _snapshot(module)
    native = nnx.clone(module)
    native.eval()
    model, state = adapters.to_equinox(module)
    inference = eqx.nn.inference_mode(model)
    built, built_state = adapters.to_equinox(module, inference=True)
    for i in range(2):
        out_n = native(inputs(i))
        out, state = inference(inputs(i), state)
        out_b, built_state = built(inputs(i), built_state)
        _assert_equal(out, out_n)
        _assert_equal(out_b, out_n)
        _assert_equal(_wrapped_rest(model, state), _native_rest(native))
        _assert_equal(built_state.get(built.state_index), _native_rest(native))
    # The module it gives back is in eval mode, like the native one.
    assert nnx.graphdef(inference.nnx_module(state)) == nnx.graphdef(native)
    assert nnx.graphdef(built.nnx_module(state)) == nnx.graphdef(native)
    # Back to training mode: the mode the module was built with.
    train = eqx.nn.inference_mode(inference, value=False)
    assert nnx.graphdef(train.nnx_module(state)) == nnx.graphdef(module)
    _assert_untouched(module, snapshot)


@pytest.mark.parametrize("name", ["batchnorm", "dropout", "mha_decode"])
def test_without_inference_runs_in_the_mode_built_with(name):
    module, inputs = _make(name)
    module.eval()
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    assert model.inference is False
    for i in range(2):
        out, state = model(inputs(i), state)
        _assert_equal(out, native(inputs(i)))
        _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    assert nnx.graphdef(model.nnx_module(state)) == nnx.graphdef(native)


def test_inference_mode_inside_jit():
    module, inputs = _make("linear_dropout")
    native = nnx.clone(module)
    native.eval()
    model, state = adapters.to_equinox(module)
    call = eqx.filter_jit(lambda m, s, x: m(x, s))
    out, state = call(eqx.nn.inference_mode(model), state, inputs(0))
    chex.assert_trees_all_close(out, native(inputs(0)), rtol=1e-6, atol=1e-6)
    _assert_equal(_wrapped_rest(model, state), _native_rest(native))


# ---------------------------------------------------------------------------
# Other methods, keyword arguments, intermediates.


def test_other_methods_and_kwargs():
    module = Tracked(nnx.Rngs(0))
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    x = jr.normal(jr.key(0), (2, 3))
    _, state = model(x, state)
    native(x)
    out, state = model(x, state, method="decode", scale=3.0)
    _assert_equal(out, native.decode(x, scale=3.0))
    _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    out, state = model(x, state, method=Tracked.decode)
    _assert_equal(out, native.decode(x))
    _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    fn = lambda m, x, k: m.linear(x) * k  # noqa: E731
    out, state = model(x, 2.0, state, method=fn)
    _assert_equal(out, fn(native, x, 2.0))


def test_mha_keyword_arguments():
    module, inputs = _make("mha_decode")
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    for i in range(2):
        out, state = model(inputs(i), state, deterministic=True, decode=True)
        _assert_equal(out, native(inputs(i), deterministic=True, decode=True))
    _assert_equal(_wrapped_rest(model, state), _native_rest(native))


def test_rngs_passed_at_call_time():
    """An NNX layer without its own RNG stream takes `rngs=` per call, as natively;
    the caller's nnx.Rngs advances as it does natively."""
    module = nnx.Dropout(0.5)
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    rngs, rngs_n = nnx.Rngs(dropout=3), nnx.Rngs(dropout=3)
    x = jnp.ones((4, 3))
    for _ in range(2):
        out, state = model(x, state, rngs=rngs)
        _assert_equal(out, native(x, rngs=rngs_n))
        _assert_equal(
            nnx.to_pure_dict(nnx.state(rngs)), nnx.to_pure_dict(nnx.state(rngs_n))
        )
    assert _wrapped_rest(model, state) == {}


class Sows(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.norm = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        h = self.linear(x)
        self.sow(nnx.Intermediate, "h", h)
        return jax.nn.relu(self.norm(h))


def test_capture_matches_nnx_capture_and_is_not_kept():
    module = Sows(nnx.Rngs(0))
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    for i in range(3):
        x = jr.normal(jr.key(i), (4, 3))
        (out, captured), state = model(x, state, capture="intermediates")
        out_n, sown_n = nnx.capture(native, nnx.Intermediate)(x)
        _assert_equal(out, out_n)
        _assert_equal(captured["intermediates"], nnx.to_pure_dict(sown_n))
        _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    # Never kept in the state.
    assert set(_wrapped_rest(model, state)) == {"norm"}
    _assert_equal(
        nnx.to_pure_dict(nnx.state(model.nnx_module(state))),
        nnx.to_pure_dict(nnx.state(native)),
    )


# ---------------------------------------------------------------------------
# JAX transformations.


@pytest.mark.parametrize("name", NAMES)
def test_filter_jit_matches_nnx_jit(name):
    module, inputs = _make(name)
    snapshot = _snapshot(module)
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    traces = []

    @eqx.filter_jit
    def step(model, state, x):
        traces.append(None)
        (loss, state), grads = eqx.filter_value_and_grad(_loss_wrapped, has_aux=True)(
            model, state, x
        )
        out, state = model(x, state)
        return loss, grads, out, state

    native_step = nnx.jit(lambda m, x: (*nnx.value_and_grad(_loss_native)(m, x), m(x)))
    for i in range(3):
        loss, grads, out, state = step(model, state, inputs(i))
        loss_n, grads_n, out_n = native_step(native, inputs(i))
        # The same program as nnx.jit's (see test_same_hlo_as_native): bit-exact.
        _assert_equal(loss, loss_n)
        _assert_equal(grads.variables, nnx.to_pure_dict(grads_n))
        _assert_equal(out, out_n)
        _assert_equal(_wrapped_rest(model, state), _native_rest(native))
    assert len(traces) == 1
    _assert_untouched(module, snapshot)


_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?) ([a-z][\w\-]*)\(")


def _instructions(hlo: str) -> collections.Counter:
    """The optimised HLO's instructions (every computation), as (shape, opcode)."""
    found = (_INSTRUCTION.match(line) for line in hlo.splitlines())
    return collections.Counter((m[1], m[2]) for m in found if m)


def _compiled(fn, *args) -> collections.Counter:
    return _instructions(fn.lower(*args).compile().as_text())


@pytest.mark.parametrize("name", NAMES)
def test_same_hlo_as_native(name):
    module, inputs = _make(name)
    x = inputs(0)
    model, state = adapters.to_equinox(module)
    params, static = eqx.partition(model, eqx.is_array)
    wrapped = _compiled(
        jax.jit(lambda p, s, x: eqx.combine(p, static)(x, s)), params, state, x
    )

    # jax.jit over nnx.split / nnx.merge, returning what the Equinox call returns:
    # the output and the non-trainable variables. The same program, instruction
    # for instruction.
    graphdef, native_params, native_rest = nnx.split(nnx.clone(module), nnx.Param, ...)

    def native_call(p, r, x):
        m = nnx.merge(graphdef, p, r)
        out = m(x)
        return out, nnx.state(m, nnx.Not(nnx.Param))

    split_merge = _compiled(jax.jit(native_call), native_params, native_rest, x)
    assert wrapped == split_merge
    assert sum(wrapped.values()) == sum(split_merge.values())

    # nnx.jit itself also hands back every nnx.Param, unchanged: its program is
    # the same but for one copy per Param into the outputs (and its output tuple).
    nnx_jit = _compiled(nnx.jit(lambda m, x: m(x)), nnx.clone(module), x)

    def drop(counter, opcodes):
        return collections.Counter(
            {k: n for k, n in counter.items() if k[1] not in opcodes}
        )

    assert drop(nnx_jit, {"copy", "tuple"}) == drop(wrapped, {"copy", "tuple"})
    extra_copies = [
        re.sub(r"\{[^}]*\}", "", shape)
        for (shape, op), n in (nnx_jit - wrapped).items()
        if op == "copy"
        for _ in range(n)
    ]
    param_shapes = [
        f"f32[{','.join(map(str, p.shape))}]" for p in jax.tree.leaves(model.variables)
    ]
    assert sorted(extra_copies) == sorted(param_shapes)
    assert not any(op == "copy" for _, op in wrapped - nnx_jit)


def test_vmap_over_inputs_with_unmapped_state():
    """A module whose call leaves its state as it is (here BatchNorm in inference
    mode, and a Linear): vmap over a stack of batches, the state unmapped in and
    out, as nnx.vmap with the module unmapped."""
    xs = jr.normal(jr.key(0), (3, 4, 3))
    for name in ("linear", "batchnorm"):
        module, _ = _make(name)
        native = nnx.clone(module)
        model, state = adapters.to_equinox(module)
        if name == "batchnorm":
            model = eqx.nn.inference_mode(model)
            native.eval()
        out, new_state = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(
            xs, state
        )
        out_n = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(native, xs)
        _assert_equal(out, out_n)
        _assert_equal(_wrapped_rest(model, new_state), _native_rest(native))


def test_vmap_with_mapped_state():
    """BatchNorm in training mode under vmap, the state mapped: per-member
    statistics, as separate native modules."""
    xs = jr.normal(jr.key(0), (3, 4, 3))
    module, _ = _make("batchnorm")
    model, state = adapters.to_equinox(module)
    states = jax.vmap(lambda _: state)(jnp.arange(3))
    out, states = jax.vmap(model)(xs, states)
    natives = [nnx.clone(module) for _ in range(3)]
    for k, native in enumerate(natives):
        chex.assert_trees_all_close(out[k], native(xs[k]), rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a: a[k], _wrapped_rest(model, states)),
            _native_rest(native),
            rtol=1e-6,
            atol=1e-6,
        )


def test_filter_vmap_over_an_ensemble():
    seeds = jnp.arange(3)

    @eqx.filter_vmap
    def make(seed):
        module = nnx.Sequential(
            nnx.Linear(3, 4, rngs=nnx.Rngs(jr.key(seed))),
            nnx.BatchNorm(4, rngs=nnx.Rngs(jr.key(seed))),
            nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=jr.key(seed))),
        )
        return adapters.to_equinox(module)

    models, states = make(seeds)
    x = jr.normal(jr.key(0), (5, 3))
    out, states = eqx.filter_vmap(lambda m, s: m(x, s))(models, states)
    for k in range(3):
        native = nnx.Sequential(
            nnx.Linear(3, 4, rngs=nnx.Rngs(k)),
            nnx.BatchNorm(4, rngs=nnx.Rngs(k)),
            nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=k)),
        )
        member = lambda t: jax.tree.map(lambda a: a[k], t)  # noqa: E731
        chex.assert_trees_all_close(
            member(models.variables), _native_params(native), rtol=1e-6, atol=1e-6
        )
        chex.assert_trees_all_close(out[k], native(x), rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(
            _no_keys(member(_wrapped_rest(models, states))),
            _no_keys(_native_rest(native)),
            rtol=1e-6,
            atol=1e-6,
        )


def test_scan_decode_loop_matches_native_loop():
    module, _ = _make("mha_decode")
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    steps = jr.normal(jr.key(0), (6, 2, 1, 4))

    def step(state, x):
        out, state = model(x, state)
        return state, out

    final, outs = jax.lax.scan(step, state, steps)
    outs_n = jnp.stack([native(x) for x in steps])
    chex.assert_trees_all_close(outs, outs_n, rtol=1e-5, atol=1e-6)
    rest, rest_n = _wrapped_rest(model, final), _native_rest(native)
    chex.assert_trees_all_close(rest, rest_n, rtol=1e-5, atol=1e-6)
    assert int(rest["cache_index"]) == int(rest_n["cache_index"]) == 6
    # The cache carried by scan is the one a python loop of wrapped calls builds.
    for x in steps:
        _, state = model(x, state)
    chex.assert_trees_all_close(_wrapped_rest(model, state), rest, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Errors.


def test_state_of_another_model():
    model, _ = adapters.to_equinox(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    other, other_state = adapters.to_equinox(nnx.BatchNorm(5, rngs=nnx.Rngs(0)))
    x = jnp.ones((2, 3))
    with pytest.raises(adapters.AdapterError) as err:
        model(x, other_state)
    message = str(err.value)
    assert "another model" in message
    assert "state/mean: expected float32[3], got float32[5]" in message
    assert "state/var: expected float32[3], got float32[5]" in message
    with pytest.raises(adapters.AdapterError, match=r"state/mean: expected"):
        model.nnx_module(other_state)
    # A state with other variables: missing and unexpected ones, by path.
    _, tracked_state = adapters.to_equinox(Tracked(nnx.Rngs(0)))
    with pytest.raises(adapters.AdapterError) as err:
        model(x, tracked_state)
    message = str(err.value)
    assert "state/mean: missing (expected float32[3])" in message
    assert "state/ema: unexpected entry" in message and "float32[4]" in message
    # An Equinox model's state holds none of this model's variables.
    _, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(adapters.AdapterError, match="none of them"):
        model(x, eqx_state)


def test_state_must_be_passed():
    model, _ = adapters.to_equinox(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(adapters.AdapterError, match="last positional"):
        model(jnp.ones((1, 3)))


class Grows(nnx.Module):
    """Appends every input to a history: fine in NNX, impossible as Equinox state."""

    def __init__(self):
        self.history = nnx.Variable(jnp.zeros((0, 3)))

    def __call__(self, x):
        self.history = nnx.Variable(jnp.concatenate([self.history[...], x]))
        return x.sum()


class ChangesDtype(nnx.Module):
    def __init__(self):
        self.total = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.total.set_value(self.total[...] + x.sum())
        return x


class CreatesLazily(nnx.Module):
    def __call__(self, x):
        if not hasattr(self, "cache"):
            self.cache = nnx.Cache(jnp.zeros_like(x))
        self.cache[...] += x
        return self.cache[...]


@pytest.mark.parametrize(
    "make, words",
    [
        (Grows, ["history", "float32[0,3]", "float32[2,3]", "fixed structure, shape"]),
        (ChangesDtype, ["total", "int32", "float32", "dtype"]),
        (CreatesLazily, ["cache", "new variable", "__init__"]),
    ],
)
def test_variable_that_changes_during_a_call(make, words):
    module = make()
    x = jnp.ones((2, 3))
    nnx.clone(module)(x)  # fine natively
    model, state = adapters.to_equinox(module)
    with pytest.raises(adapters.AdapterError) as err:
        model(x, state)
    message = str(err.value)
    for word in words:
        assert word in message, (word, message)


class ResetsWithScalar(nnx.Module):
    def __init__(self):
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.total = nnx.BatchStat(jnp.zeros(()))

    def __call__(self, x):
        self.count.set_value(0)  # a Python scalar: a weakly typed int32 value
        self.total.set_value(0.0)
        return x


def test_state_reset_with_a_python_scalar():
    module = ResetsWithScalar()
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    x = jnp.ones(2)
    out, state = model(x, state)
    _assert_equal(out, native(x))
    chex.assert_trees_all_equal(_wrapped_rest(model, state), _native_rest(native))


class SowsOutsideCapture(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = self.linear(x)
        self.sow(nnx.Intermediate, "h", h)
        return h


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside")
def test_module_already_holding_intermediates():
    module = SowsOutsideCapture(nnx.Rngs(0))
    x = jnp.ones((1, 3))
    module(x)  # a native call outside nnx.capture keeps what it sowed
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module)
    out, state = model(x, state)
    _assert_equal(out, native(x))


class AssignsParam(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones(3))

    def __call__(self, x):
        self.w[...] = self.w[...] * 0.5
        return x * self.w[...]


def test_assigning_a_trainable_variable():
    module = AssignsParam()
    x = jnp.arange(3.0)
    nnx.clone(module)(x)  # fine natively
    model, state = adapters.to_equinox(module)
    with pytest.raises(adapters.AdapterError) as err:
        model(x, state)
    message = str(err.value)
    assert "assigned new values to trainable variables" in message
    assert "  variables/w\n" in message  # the path, as the model's `variables`
    assert "nnx.Not(nnx.PathContains('w'))" in message  # the filter that fixes it
    # As the message says: as state (not trainable), the call is the native one.
    native = nnx.clone(module)
    model, state = adapters.to_equinox(module, trainable=nnx.Nothing)
    assert model.variables == {}
    for _ in range(2):
        out, state = model(x, state)
        _assert_equal(out, native(x))
        _assert_equal(_wrapped_rest(model, state), nnx.to_pure_dict(nnx.state(native)))


class SharedVariable(nnx.Module):
    def __init__(self):
        self.a = nnx.Param(jnp.arange(3.0))
        self.b = self.a

    def __call__(self, x):
        return x * self.a[...] + self.b[...]


@pytest.mark.parametrize("bad", [3, 0.5])
def test_trainable_that_is_not_a_filter(bad):
    with pytest.raises(TypeError, match="`trainable` must be an NNX filter") as err:
        adapters.to_equinox(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), trainable=bad)
    assert isinstance(err.value, adapters.AdapterError)
    assert f"got {bad!r} ({type(bad).__name__})" in str(err.value)


def test_module_that_cannot_be_split():
    # NNX's tree mode refuses a variable held in two places: nnx.split fails.
    with nnx.set_graph_mode(False):
        with pytest.raises(ValueError):
            nnx.split(SharedVariable())
        with pytest.raises(adapters.AdapterError) as err:
            adapters.to_equinox(SharedVariable())
    message = str(err.value)
    assert "could not split" in message and "SharedVariable" in message
    assert "shared references" in message  # NNX's own reason
    # In graph mode (the default), the shared variable is one trainable leaf and
    # gradients accumulate on it, as nnx.grad's.
    module = SharedVariable()
    model, state = adapters.to_equinox(module)
    assert set(model.variables) == {"a"}
    x = jnp.arange(3.0)
    grads, _ = eqx.filter_grad(
        lambda m: (lambda o, s: (o.sum(), s))(*m(x, state)), has_aux=True
    )(model)
    grads_n = nnx.grad(lambda m: m(x).sum())(nnx.clone(module))
    _assert_equal(grads.variables, nnx.to_pure_dict(grads_n))


@pytest.mark.parametrize("obj", [object(), nnx.Param(jnp.ones(3)), nnx.Rngs(0)])
def test_not_a_module(obj):
    with pytest.raises(TypeError):
        adapters.to_equinox(obj)
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        adapters.NNXToEquinox(obj)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        pytest.param((jnp.ones((1, 3)),), {}, id="example-args"),
        pytest.param((), dict(key=jr.key(0)), id="key"),
        pytest.param((), dict(variables={}), id="variables"),
        pytest.param((), dict(train_kwarg="train"), id="train_kwarg"),
        pytest.param((), dict(deterministic_kwarg="det"), id="deterministic_kwarg"),
        pytest.param((), dict(init_method="__call__"), id="init_method"),
        pytest.param((), dict(rng_streams=("dropout", "noise")), id="rng_streams"),
        pytest.param((), dict(some_linen_kwarg=1), id="init-kwargs"),
        pytest.param(
            (),
            dict(per_call=("intermediates", "losses")),
            id="per_call",
        ),
    ],
)
def test_linen_only_options_are_refused(args, kwargs):
    module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="trainable="):
        adapters.to_equinox(module, *args, **kwargs)


def test_to_equinox_class_hints_at_the_nnx_path():
    with pytest.raises(TypeError, match=r"adapters\.to_equinox"):
        adapters.ToEquinox(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
