"""`ToLinen`: conventions, errors, and both directions composed, against native
Equinox and native linen."""

import functools
from typing import Any

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

import adapters


def _bn(size, **kwargs):
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        size, axis_name="batch", mode="batch", **kwargs
    )


class Stack(eqx.Module):
    """A native Equinox block with params, an integer buffer and state."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    steps: jax.Array

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")
        self.steps = jnp.arange(3)

    def __call__(self, x, state, *, key=None):
        y, state = self.norm(self.linear(x), state)
        return y + jnp.sum(self.steps).astype(y.dtype), state


def test_layout_and_round_trip(getkey):
    model, state = eqx.nn.make_with_state(Stack)(getkey())
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    assert set(variables) == {"params", "constants", "batch_stats"}
    assert variables["params"]["linear"]["weight"] is model.linear.weight
    assert variables["constants"]["steps"] is model.steps
    assert (
        variables["batch_stats"]["norm"]["batch_state_index"][0]
        is state.get(model.norm.batch_state_index)[0]
    )
    back, back_state = module.equinox_model(variables)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(back), strict=True):
        assert a is b
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back_state), strict=True):
        assert a is b


def test_apply_and_update_match_native(getkey):
    model, state = eqx.nn.make_with_state(Stack)(getkey())
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    x = jr.normal(getkey(), (6, 3))
    out, updates = module.apply(variables, x, mutable=["batch_stats"])
    native, native_state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    chex.assert_trees_all_close(out, native)
    _, new_state = module.equinox_model({**variables, **updates})
    chex.assert_trees_all_close(new_state, native_state)


def test_state_update_needs_mutable(getkey):
    bn, state = _bn(3)
    module, variables = adapters.to_linen(bn, state, vmap_axis=0, axis_name="batch")
    x = jr.normal(getkey(), (4, 3))
    with pytest.raises(adapters.AdapterError, match="'batch_stats' is not\nmutable"):
        module.apply(variables, x)
    # inference=True reads the state only: no update, no error, native result.
    out = module.apply(variables, x, inference=True)
    native, _ = jax.vmap(
        eqx.nn.inference_mode(bn),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )(x, state)
    chex.assert_trees_all_equal(out, native)


def test_per_example_state_without_axis_name(getkey):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    module, variables = adapters.to_linen(bn, state, vmap_axis=0)  # no axis_name
    x = jr.normal(getkey(), (4, 3))
    with pytest.raises(adapters.AdapterError, match="reduces over axis name 'batch'"):
        module.apply(variables, x, mutable=True)
    # The fix the message gives: name the axis as the layer does.
    module, variables = adapters.to_linen(bn, state, vmap_axis=0, axis_name="batch")
    out, _ = module.apply(variables, x, mutable=True)
    native, _ = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )
    chex.assert_trees_all_close(out, native)


class PerExampleCounter(eqx.Module):
    """Stateful, but its update depends on the example: no batch reduction."""

    index: eqx.nn.StateIndex

    def __init__(self):
        self.index = eqx.nn.StateIndex(jnp.zeros(3))

    def __call__(self, x, state):
        return x, state.set(self.index, state.get(self.index) + x)


def test_per_example_state_update_is_refused(getkey):
    model, state = eqx.nn.make_with_state(PerExampleCounter)()
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    with pytest.raises(
        adapters.AdapterError, match=r"different state update for each\sexample"
    ):
        module.apply(variables, jr.normal(getkey(), (4, 3)), mutable=True)


def test_factory_is_rebuilt_without_compute(getkey):
    """At apply, the factory runs under `eqx.filter_eval_shape`: it sees an
    abstract key and allocates nothing. (The spy records what it saw, not the key
    itself: keeping a tracer would be a leak, for which the model is built for
    real, see `test_factory_whose_model_closes_over_an_array`.)"""
    keys_seen = []
    init_keys = []

    def make(key):
        traced = isinstance(key, jax.core.Tracer)
        keys_seen.append(traced)
        if not traced:
            init_keys.append(key)
        return eqx.nn.Linear(3, 2, key=key)

    module = adapters.ToLinen(make=make)
    x = jnp.ones(3)
    key = getkey()
    variables = module.init(key, x)
    assert keys_seen == [False]
    native = eqx.nn.Linear(3, 2, key=init_keys[0])
    chex.assert_trees_all_equal(
        variables["params"], {"weight": native.weight, "bias": native.bias}
    )
    out = module.apply(variables, x)
    assert keys_seen == [False, True]
    chex.assert_trees_all_equal(out, native(x))


def test_factory_key_comes_from_params_stream(getkey):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return adapters.ToLinen(make=lambda k: eqx.nn.Linear(3, 2, key=k))(x)

    key = getkey()
    variables = Net().init(key, jnp.ones(3))
    expected_key = Net().init(key, jnp.ones(3))  # deterministic: the same key
    chex.assert_trees_all_equal(variables, expected_key)
    other = Net().init(getkey(), jnp.ones(3))
    assert not jnp.array_equal(
        other["params"]["ToLinen_0"]["weight"],
        variables["params"]["ToLinen_0"]["weight"],
    )


def test_variables_that_do_not_fit(getkey):
    model = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    module, variables = adapters.to_linen(model)
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["layers"]["0"]["weight"] = jnp.zeros((5, 3))
    del bad["params"]["layers"]["1"]["bias"]
    with pytest.raises(adapters.AdapterError) as info:
        module.equinox_model(bad)
    message = str(info.value)
    assert "params/layers/0/weight: expected float32[4,3], got float32[5,3]" in message
    assert "params/layers/1/bias: missing (expected float32[2])" in message
    with pytest.raises(adapters.AdapterError, match="layers/0/weight"):
        module.apply(bad, jnp.ones(3))


def test_factory_must_return_a_module():
    module = adapters.ToLinen(make=lambda key: jnp.zeros(3))
    with pytest.raises(TypeError, match="must return an Equinox module") as info:
        module.init(jr.key(0), jnp.ones(3))
    assert isinstance(info.value, adapters.AdapterError)


def test_state_collection_clashing_with_params(getkey):
    with pytest.raises(adapters.AdapterError, match="three different collections"):
        adapters.to_linen(eqx.nn.Linear(2, 2, key=getkey()), state_collection="params")
    with pytest.raises(adapters.AdapterError, match="three different collections"):
        adapters.ToLinen(
            make=lambda k: eqx.nn.Linear(2, 2, key=k), buffer_collection="batch_stats"
        ).init(getkey(), jnp.ones(2))


def test_model_xor_make(getkey):
    with pytest.raises(adapters.AdapterError, match="exactly one"):
        adapters.ToLinen().init(getkey(), jnp.ones(2))


def test_stateful_model_without_state(getkey):
    bn, _ = _bn(3)  # make_with_state removed the initial state from the model
    with pytest.raises(adapters.AdapterError, match="no `eqx.nn.State`"):
        adapters.to_linen(bn)
    # A model built directly still holds its initial state: that is used.
    raw = eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")
    module, variables = adapters.to_linen(raw, vmap_axis=0, axis_name="batch")
    chex.assert_trees_all_equal(
        variables["batch_stats"]["batch_state_index"],
        eqx.nn.State(raw).get(raw.batch_state_index),
    )


def test_rng_stream_becomes_key(getkey):
    """The model's `key` is the wrapper's `self.make_rng("dropout")`, the key any
    linen layer in its place would draw."""
    model = eqx.nn.Dropout(0.5)
    module, variables = adapters.to_linen(model)
    x, rngs = jnp.ones(20), {"dropout": getkey()}
    out = module.apply(variables, x, rngs=rngs)
    key = module.apply(variables, rngs=rngs, method=lambda m: m.make_rng("dropout"))
    chex.assert_trees_all_equal(out, model(x, key=key))
    assert (out == 0).any()
    chex.assert_trees_all_equal(module.apply(variables, x, inference=True), x)


# --- both directions composed ------------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)


def test_to_equinox_of_to_linen(getkey):
    """Equinox -> linen -> Equinox computes what the original Equinox model does."""
    model, state = eqx.nn.make_with_state(Stack)(getkey())
    linen_module, _ = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    x = jr.normal(getkey(), (5, 3))
    wrapped, wstate = adapters.to_equinox(linen_module, x, key=getkey())
    out, wstate = wrapped(x, wstate)
    native, native_state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    chex.assert_trees_all_close(out, native)
    _, back_state = linen_module.equinox_model(wrapped.linen_variables(wstate))
    chex.assert_trees_all_close(back_state, native_state)


def test_to_linen_of_to_equinox(getkey):
    """linen -> Equinox -> linen computes what the original linen module does."""
    x = jr.normal(getkey(), (5, 3))
    block, state = adapters.to_equinox(
        LinenBlock(), x, key=getkey(), train_kwarg="train"
    )
    variables = block.linen_variables(state)
    module, linen_variables = adapters.to_linen(block, state)
    out, updates = module.apply(linen_variables, x, mutable=["batch_stats"])
    native, native_updates = LinenBlock().apply(
        variables, x, train=True, mutable=["batch_stats"]
    )
    chex.assert_trees_all_equal(out, native)
    back, back_state = module.equinox_model({**linen_variables, **updates})
    chex.assert_trees_all_equal(
        back.linen_variables(back_state)["batch_stats"], native_updates["batch_stats"]
    )
    # Inference through both layers: inference=True -> inference_mode -> train=False.
    out = module.apply(linen_variables, x, inference=True)
    chex.assert_trees_all_equal(out, LinenBlock().apply(variables, x, train=False))


class EqxWithLinenInside(eqx.Module):
    """An Equinox block holding a linen block (through ToEquinox)."""

    inner: adapters.ToEquinox
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.inner = adapters.ToEquinox(
            LinenBlock(), jnp.zeros((2, 3)), key=k1, train_kwarg="train"
        )
        self.out = eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x, state, *, key=None):
        y, state = self.inner(x, state)
        return jax.vmap(self.out)(jax.nn.relu(y)), state


class Sandwich(nn.Module):
    """linen -> Equinox -> linen: a linen model with an Equinox block inside, which
    itself holds a linen block."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(3)(x)
        x = adapters.ToLinen(
            make=lambda k: eqx.nn.make_with_state(EqxWithLinenInside)(k)
        )(x, inference=not train)
        return nn.Dense(1)(x)


def test_sandwich_trains_end_to_end(getkey):
    x = jr.normal(getkey(), (16, 2))
    y = jnp.sum(x, axis=-1, keepdims=True)
    variables = Sandwich().init(getkey(), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    inner_path = ("ToLinen_0", "inner", "state_indices", "batch_stats")
    optim = optax.adam(1e-2)
    opt_state = optim.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            pred, updates = Sandwich().apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((pred - y) ** 2), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    def innermost_mean(stats):
        for k in inner_path:
            stats = stats[k]
        return stats["BatchNorm_0"]["mean"]

    losses = []
    for _ in range(20):
        params, new_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
        # The innermost linen BatchNorm's running mean moves, step after step.
        assert not jnp.allclose(innermost_mean(batch_stats), innermost_mean(new_stats))
        batch_stats = new_stats
    assert losses[-1] < 0.5 * losses[0]


def test_factory_of_a_model_holding_its_initial_state(getkey):
    """A factory may return a stateful model built directly (not through
    `make_with_state`): its initial state is collected, at init and at apply."""
    module = adapters.ToLinen(
        make=lambda key: eqx.nn.BatchNorm(3, axis_name="batch", mode="batch"),
        vmap_axis=0,
        axis_name="batch",
    )
    x = jr.normal(getkey(), (4, 3))
    variables = module.init(getkey(), x)
    out, updates = module.apply(variables, x, mutable=["batch_stats"])
    bn, state = _bn(3)
    native, native_state = jax.vmap(
        bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    chex.assert_trees_all_close(out, native)
    _, new_state = module.equinox_model({**variables, **updates})
    chex.assert_trees_all_close(
        jax.tree.leaves(new_state), jax.tree.leaves(native_state)
    )


def test_missing_rng_stream_hint(getkey):
    module, variables = adapters.to_linen(eqx.nn.Dropout(0.5))
    with pytest.raises(adapters.AdapterError, match=r"rngs=\{'dropout': key\}"):
        module.apply(variables, jnp.ones(4))


def test_per_example_model_on_a_batch_without_vmap_axis(getkey):
    """An Equinox model acts on one example: given linen's batch without
    `vmap_axis`, the error says so and names the fix, instead of JAX's shape error;
    with the fix, the output is the native per-example one."""
    mlp = eqx.nn.MLP(3, 2, 8, 2, key=getkey())
    x = jr.normal(getkey(), (8, 3))
    module, variables = adapters.to_linen(mlp)
    with pytest.raises(adapters.AdapterError, match=r"act on one example") as info:
        module.apply(variables, x)
    assert "vmap_axis=0" in str(info.value)
    assert "dot_general" in str(info.value)  # the underlying failure, named
    module, variables = adapters.to_linen(mlp, vmap_axis=0)
    chex.assert_trees_all_equal(module.apply(variables, x), jax.vmap(mlp)(x))


def test_axis_name_without_vmap_axis(getkey):
    """A model reducing over a named axis, called without `vmap_axis`: on a batch,
    the error names both options; on one example, JAX's "unbound axis name ...
    shard_map" becomes an error naming them too."""
    model, state = eqx.nn.make_with_state(Stack)(getkey())
    x = jr.normal(getkey(), (8, 3))
    module, variables = adapters.to_linen(model, state)
    with pytest.raises(adapters.AdapterError, match=r"act on one example") as info:
        module.apply(variables, x, mutable=["batch_stats"])
    assert "vmap_axis=0, axis_name='batch'" in str(info.value)
    # One example (no batch) reaches the same axis: the same error, not a shape one.
    with pytest.raises(adapters.AdapterError, match=r"axis name 'batch'"):
        module.apply(variables, x[0], mutable=["batch_stats"])


def test_a_model_failing_for_another_reason_keeps_its_error(getkey):
    """Only a failure that mapping over axis 0 would fix is rewritten: a model
    that fails per example too keeps JAX's own error."""
    mlp = eqx.nn.MLP(3, 2, 8, 2, key=getkey())
    module, variables = adapters.to_linen(mlp)
    with pytest.raises(TypeError, match="dot_general"):
        module.apply(variables, jnp.ones((8, 5)))


class Shift(eqx.Module):
    """A model whose static field closes over an array its constructor made (as
    flowjax's couplings keep a closure over their initial parameters)."""

    linear: eqx.nn.Linear
    shift: Any = eqx.field(static=True)

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 3, key=key)
        offsets = jnp.arange(3.0)
        self.shift = lambda y: y + offsets

    def __call__(self, x):
        return self.shift(self.linear(x))


def _native_shift(variables, x):
    """The same computation natively: a `Shift` holding the variables' arrays."""
    native = eqx.tree_at(
        lambda m: (m.linear.weight, m.linear.bias),
        Shift(jr.key(0)),
        (
            variables["params"]["linear"]["weight"],
            variables["params"]["linear"]["bias"],
        ),
    )
    return jax.vmap(native)(x)


def test_factory_whose_model_closes_over_an_array(getkey):
    """Built from shapes alone, such a model would hold a dead tracer
    (`UnexpectedTracerError` at its first call): it is built for real in the
    apply's trace instead, and computes what the native model computes, eagerly,
    under `jax.jit` and back through `equinox_model`."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return adapters.ToLinen(make=Shift, vmap_axis=0)(x)

    x = jr.normal(getkey(), (4, 3))
    variables = Net().init(getkey(), x)
    inner = {"params": variables["params"]["ToLinen_0"]}
    want = _native_shift(inner, x)
    chex.assert_trees_all_close(Net().apply(variables, x), want, rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(Net().apply)(variables, x), want, rtol=1e-6)
    model, state = adapters.ToLinen(make=Shift).equinox_model(inner)
    assert state is None
    chex.assert_trees_all_close(jax.vmap(model)(x), want, rtol=1e-6)
    assert model.linear.weight is inner["params"]["linear"]["weight"]  # no copy


def test_a_leaking_factory_is_found_once(getkey):
    """Finding that a factory's model leaks when built from shapes happens once a
    factory: later traces, with the factory re-created as a lambda of the same
    code, build the model for real at once. Counted in factory calls: the first
    trace builds twice (from shapes, which leaks, then for real), every later one
    once; the results stay native's."""
    calls = []

    def make_net():
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                def make(key):  # a new function at every call, the same code
                    calls.append(key)
                    return Shift(key)

                return adapters.ToLinen(make=make, vmap_axis=0)(x)

        return Net()

    x = jr.normal(getkey(), (4, 3))
    variables = make_net().init(getkey(), x)
    inner = {"params": variables["params"]["ToLinen_0"]}
    want = _native_shift(inner, x)
    del calls[:]
    chex.assert_trees_all_close(make_net().apply(variables, x), want, rtol=1e-6)
    first = len(calls)
    del calls[:]
    chex.assert_trees_all_close(make_net().apply(variables, x), want, rtol=1e-6)
    assert (first, len(calls)) in [(2, 1), (1, 1)]  # (1, 1): found by an earlier test
    del calls[:]
    jitted = jax.jit(make_net().apply)(variables, x)
    chex.assert_trees_all_close(jitted, want, rtol=1e-6)
    assert len(calls) == 1


class _Slots:
    __slots__ = ("offsets",)


class _MoreSlots(_Slots):  # the array sits in a base class's slot
    __slots__ = ("scale",)


def _local_class(key):
    offsets = jnp.arange(3.0)

    class Local(eqx.Module):  # a class made by the factory, closing over an array
        linear: eqx.nn.Linear

        def __call__(self, x):
            return self.linear(x) + offsets

    return Local(eqx.nn.Linear(3, 3, key=key))


class _Held(eqx.Module):
    linear: eqx.nn.Linear
    held: Any = eqx.field(static=True)

    def __call__(self, x):
        held = self.held
        if isinstance(held, functools.partial):
            return held(self.linear(x))
        return self.linear(x) * held.scale + held.offsets


def _in_slots(key):
    held = _MoreSlots()
    held.offsets, held.scale = jnp.arange(3.0), 2.0
    return _Held(eqx.nn.Linear(3, 3, key=key), held)


def _in_partial(key):
    return _Held(
        eqx.nn.Linear(3, 3, key=key), functools.partial(jnp.add, jnp.arange(3.0))
    )


@pytest.mark.parametrize("make", [_local_class, _in_slots, _in_partial])
def test_leaks_in_other_places_are_found(make, getkey):
    """An array made by the factory held in a class the factory defines, in a base
    class's `__slots__`, or in a `functools.partial`: each is found and the model
    built for real, computing what the native model computes."""
    module = adapters.ToLinen(make=make, vmap_axis=0)
    x = jr.normal(getkey(), (4, 3))
    variables = module.init(getkey(), x)
    params = variables["params"]["linear"]
    native = eqx.tree_at(  # built natively, holding the variables' arrays
        lambda m: (m.linear.weight, m.linear.bias),
        make(jr.key(0)),
        (params["weight"], params["bias"]),
    )
    want = jax.vmap(native)(x)
    chex.assert_trees_all_close(module.apply(variables, x), want, rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(module.apply)(variables, x), want, rtol=1e-6)


def test_a_model_without_leaks_is_built_from_shapes(getkey):
    """The walk finds no tracer in an ordinary model, even while a leaking model's
    tracers are alive elsewhere (reachable only through JAX's global pytree
    registry): it is built from shapes, as before."""
    from adapters._to_linen import _holds_tracer

    leaking = eqx.filter_eval_shape(_local_class, jr.key(0))
    plain = eqx.filter_eval_shape(
        lambda k: eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch"),
        jr.key(0),
    )
    assert _holds_tracer(leaking) is True
    assert _holds_tracer(plain) is False
    assert _holds_tracer(eqx.filter_eval_shape(_in_partial, jr.key(0))) is True


def test_factory_of_a_flowjax_flow(getkey):
    """A real library's model of that kind: a flowjax coupling flow (its
    couplings close over their initial parameters), its log density in linen."""
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow

    class LogProb(eqx.Module):
        flow: Any

        def __call__(self, x):
            return self.flow.log_prob(x)

    def make(key):
        flow = coupling_flow(
            key, base_dist=Normal(jnp.zeros(3)), flow_layers=2, nn_width=8
        )
        return LogProb(flow)

    module = adapters.ToLinen(make=make)
    x = jr.normal(getkey(), (5, 3))
    variables = jax.jit(module.init)(getkey(), x)
    out = jax.jit(module.apply)(variables, x)
    model, _ = module.equinox_model(variables)  # no dead tracer in it
    # Natively: a flow built by the library, holding the variables' arrays.
    native = make(jr.key(0))
    native = eqx.combine(
        eqx.filter(model, eqx.is_array), eqx.filter(native, eqx.is_array, inverse=True)
    )
    want = jax.jit(lambda x: native(x))(x)
    chex.assert_trees_all_close(out, want, rtol=1e-5)
    chex.assert_trees_all_close(jax.jit(lambda x: model(x))(x), want, rtol=1e-5)


def test_factory_that_cannot_be_rebuilt_points_to_model(getkey):
    """A factory whose model needs rebuilding in the trace, and whose rebuild
    fails, is an AdapterError naming the cause and pointing to `model=`."""
    calls = []

    def make(key):
        if not isinstance(key, jax.core.Tracer):
            calls.append(key)
            if len(calls) > 1:
                raise RuntimeError("this factory builds its model once")
        return Shift(key)

    module = adapters.ToLinen(make=make, vmap_axis=0)
    x = jr.normal(getkey(), (4, 3))
    variables = module.init(getkey(), x)
    with pytest.raises(adapters.AdapterError, match="builds its model once") as info:
        module.apply(variables, x)
    assert "adapters.to_linen(model, state)" in str(info.value)


def test_nn_jit_of_a_model_field_says_to_use_make(getkey):
    """`nn.jit` fingerprints the module's fields and cannot fingerprint arrays: a
    `model=` under `nn.jit` is refused with the fix, and the fix computes what
    the model computes."""
    mlp = eqx.nn.MLP(3, 2, 8, 1, key=getkey())
    x = jr.normal(getkey(), (4, 3))
    with pytest.raises(adapters.AdapterError, match=r"make=lambda key: model"):
        nn.jit(adapters.ToLinen)(model=mlp, vmap_axis=0)
    module = nn.jit(adapters.ToLinen)(make=lambda key: mlp, vmap_axis=0)
    variables = module.init(getkey(), x)
    chex.assert_trees_all_equal(
        variables["params"]["layers"]["0"]["weight"], mlp.layers[0].weight
    )
    chex.assert_trees_all_close(module.apply(variables, x), jax.vmap(mlp)(x), rtol=1e-6)


def test_a_trace_builds_the_layout_once_per_model(getkey, monkeypatch):
    """The model's layout (a walk of the model and the check of its state) is
    built once per model and state and kept: retracing an `apply` does not walk
    the model again, and a wrong variables dict is still reported by path."""
    built = []
    original = adapters._to_linen.Layout

    class Counting(original):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(adapters._to_linen, "Layout", Counting)
    model, state = eqx.nn.make_with_state(Stack)(getkey())
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    x = jr.normal(getkey(), (8, 3))
    for _ in range(3):  # three fresh traces
        jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))(variables, x)
    assert len(built) == 1
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["linear"]["weight"] = jnp.zeros((5, 3))
    with pytest.raises(adapters.AdapterError, match=r"params/linear/weight"):
        module.apply(bad, x, mutable=["batch_stats"])


def test_the_kept_layout_does_not_keep_the_model_alive(getkey):
    import gc
    import weakref

    mlp = eqx.nn.MLP(3, 2, 8, 1, key=getkey())
    module, variables = adapters.to_linen(mlp, vmap_axis=0)
    module.apply(variables, jnp.ones((2, 3)))
    assert id(mlp) in adapters._to_linen._LAYOUTS
    ref, key = weakref.ref(mlp), id(mlp)
    del mlp, module, variables
    gc.collect()
    assert ref() is None
    assert key not in adapters._to_linen._LAYOUTS
