"""The call convention of `ToEquinox`, each behaviour against native linen/Equinox."""

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import adapters


class Block(nn.Module):
    """Dense + BatchNorm + Dropout, switched by a `train` keyword."""

    features: int = 5

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.features)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(2)(x)


def _x(key, shape=(6, 3)):
    return jr.normal(key, shape)


def test_init_is_linen_init_with_derived_keys(getkey):
    key, x = getkey(), _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=key, train_kwarg="train")
    native = Block().init(
        adapters.linen_rngs(key, ("params", "dropout")), x, train=False
    )
    chex.assert_trees_all_equal(model.linen_variables(state), native)
    # Trainable arrays are leaves in linen's own layout; the rest is state.
    assert set(model.variables) == {"params"}
    assert set(model.state_indices) == {"batch_stats"}
    chex.assert_trees_all_equal(model.variables["params"], native["params"])
    chex.assert_trees_all_equal(
        state.get(model.state_indices["batch_stats"]), native["batch_stats"]
    )


def test_to_equinox_is_make_with_state(getkey):
    key, x = getkey(), _x(getkey())
    kwargs = dict(key=key, train_kwarg="train")
    model1, state1 = adapters.to_equinox(Block(), x, **kwargs)
    model2, state2 = eqx.nn.make_with_state(adapters.ToEquinox)(Block(), x, **kwargs)
    assert jax.tree.structure(model1) == jax.tree.structure(model2)
    chex.assert_trees_all_equal(model1, model2)
    chex.assert_trees_all_equal(state1, state2)


@pytest.mark.parametrize("inference", [False, True])
def test_call_matches_native_apply(getkey, inference):
    key, x, dkey = getkey(), _x(getkey()), getkey()
    model, state = adapters.to_equinox(Block(), x, key=key, train_kwarg="train")
    variables = model.linen_variables(state)
    if inference:
        model = eqx.nn.inference_mode(model)
    out, new_state = model(x, state, key=dkey)
    native_out, updates = Block().apply(
        variables,
        x,
        train=not inference,
        rngs=adapters.linen_rngs(dkey),
        mutable=["batch_stats"],
    )
    chex.assert_trees_all_equal(out, native_out)
    chex.assert_trees_all_equal(
        new_state.get(model.state_indices["batch_stats"]), updates["batch_stats"]
    )
    changed = not jnp.allclose(
        updates["batch_stats"]["BatchNorm_0"]["mean"],
        variables["batch_stats"]["BatchNorm_0"]["mean"],
    )
    assert changed == (not inference)


def test_explicit_keyword_wins_over_inference(getkey):
    key, x = getkey(), _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=key, train_kwarg="train")
    variables = model.linen_variables(state)
    model = eqx.nn.inference_mode(model)
    # train=True given explicitly: training behaviour despite inference mode.
    dkey = getkey()
    out, state = model(x, state, key=dkey, train=True)
    native, _ = Block().apply(
        variables, x, train=True, rngs=adapters.linen_rngs(dkey), mutable=True
    )
    chex.assert_trees_all_equal(out, native)


def test_deterministic_kwarg_maps_the_opposite_way(getkey):
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool):
            return nn.Dropout(0.5)(x, deterministic=deterministic)

    x = jnp.ones((4, 8))
    model, state = adapters.to_equinox(
        Drop(), x, key=getkey(), deterministic_kwarg="deterministic"
    )
    dkey = getkey()
    out, _ = model(x, state, key=dkey)
    native = Drop().apply({}, x, deterministic=False, rngs=adapters.linen_rngs(dkey))
    chex.assert_trees_all_equal(out, native)
    assert (out == 0).any()
    out, _ = eqx.nn.inference_mode(model)(x, state)
    chex.assert_trees_all_equal(out, x)


def test_inference_mode_works_under_jit(getkey):
    """`inference` is an ordinary field, so `inference_mode` uses `eqx.tree_at` and
    the jitted program follows it."""
    x = _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=getkey(), train_kwarg="train")
    variables = model.linen_variables(state)

    @eqx.filter_jit
    def run(model, x, state):
        return model(x, state, key=jr.key(0))

    out, _ = run(eqx.nn.inference_mode(model), x, state)
    chex.assert_trees_all_equal(out, Block().apply(variables, x, train=False))


def test_linen_rngs_derivation(getkey):
    key = getkey()
    rngs = adapters.linen_rngs(key, ("dropout", "noise"))
    assert set(rngs) == {"dropout", "noise"}
    # A stream's key depends on its name only, not on which other streams exist.
    chex.assert_trees_all_equal(
        jr.key_data(rngs["dropout"]),
        jr.key_data(adapters.linen_rngs(key, ("dropout",))["dropout"]),
    )
    assert not (jr.key_data(rngs["dropout"]) == jr.key_data(rngs["noise"])).all()
    # Raw uint32 keys work too.
    raw = adapters.linen_rngs(jr.PRNGKey(0), "dropout")
    assert raw["dropout"].dtype == jnp.uint32


def test_only_declared_streams_are_passed(getkey):
    """Linen falls back to `params` for a missing stream; the adapter never passes
    `params` at call time, so an undeclared stream is an error, not a fallback."""

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + jr.normal(self.make_rng("noise"), x.shape)

    x = jnp.zeros(3)
    model, state = adapters.to_equinox(Noisy(), x, key=getkey(), rng_streams=("noise",))
    key = getkey()
    out, _ = model(x, state, key=key)
    chex.assert_trees_all_equal(
        out, Noisy().apply({}, x, rngs=adapters.linen_rngs(key, "noise"))
    )
    with pytest.raises(adapters.AdapterError, match="noise"):
        eqx.nn.make_with_state(adapters.ToEquinox)(Noisy(), variables={})[0](
            x, eqx.nn.State({}), key=key
        )


def test_wrapping_shares_buffers(getkey):
    """Wrapping existing variables copies nothing: the leaves are the same arrays."""
    x = _x(getkey())
    variables = Block().init(adapters.linen_rngs(getkey(), ("params",)), x, train=False)
    model, state = adapters.to_equinox(
        Block(), x, variables=variables, train_kwarg="train"
    )
    back = model.linen_variables(state)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        assert a is b
    for a, b in zip(
        jax.tree.leaves(variables["params"]),
        jax.tree.leaves(model.variables["params"]),
        strict=True,
    ):
        assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()


class Outer(eqx.Module):
    """A native Equinox model holding a wrapped linen block and a native BatchNorm."""

    block: adapters.ToEquinox
    norm: eqx.nn.BatchNorm

    def __init__(self, x, key):
        self.block = adapters.ToEquinox(Block(), x, key=key, train_kwarg="train")
        self.norm = eqx.nn.BatchNorm(2, axis_name="batch", mode="batch")

    def __call__(self, x, state, key):
        y, state = self.block(x, state, key=key)
        return jax.vmap(
            self.norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(y, state)


def test_inside_a_larger_model(getkey):
    x, key = _x(getkey()), getkey()
    outer, state = eqx.nn.make_with_state(Outer)(x, key)
    # The larger state holds the block's collections, under the block's indices.
    variables = outer.block.linen_variables(state)
    native_init = Block().init(
        adapters.linen_rngs(key, ("params", "dropout")), x, train=False
    )
    chex.assert_trees_all_equal(variables, native_init)
    dkey = getkey()
    out, new_state = outer(x, state, dkey)
    y, updates = Block().apply(
        variables, x, train=True, rngs=adapters.linen_rngs(dkey), mutable=True
    )
    norm, norm_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        2, axis_name="batch", mode="batch"
    )
    expected, norm_state = jax.vmap(
        norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(y, norm_state)
    chex.assert_trees_all_close(out, expected)
    chex.assert_trees_all_equal(
        new_state.get(outer.block.state_indices["batch_stats"]), updates["batch_stats"]
    )
    chex.assert_trees_all_close(
        new_state.get(outer.norm.batch_state_index),
        norm_state.get(norm.batch_state_index),
    )


def test_plain_jax_jit_with_partition(getkey):
    x, key = _x(getkey()), getkey()
    model, state = adapters.to_equinox(Block(), x, key=key, train_kwarg="train")
    variables = model.linen_variables(state)
    arrays, static = eqx.partition(model, eqx.is_array)
    assert static.inference is False  # a Python bool, not traced

    @jax.jit
    def loss_and_state(arrays, x, state, key):
        out, state = eqx.combine(arrays, static)(x, state, key=key)
        return jnp.mean(out**2), state

    dkey = getkey()
    (loss, new_state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(
        arrays, x, state, dkey
    )

    def native_loss(params):
        out, updates = Block().apply(
            {**variables, "params": params},
            x,
            train=True,
            rngs=adapters.linen_rngs(dkey),
            mutable=["batch_stats"],
        )
        return jnp.mean(out**2), updates

    (native, updates), native_grads = jax.value_and_grad(native_loss, has_aux=True)(
        variables["params"]
    )
    chex.assert_trees_all_close(loss, native, rtol=1e-6)
    # (A bias before BatchNorm has a zero gradient up to rounding: hence atol.)
    chex.assert_trees_all_close(
        grads.variables["params"], native_grads, rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(
        new_state.get(model.state_indices["batch_stats"]), updates["batch_stats"]
    )


def test_traced_inference_flag_is_explained(getkey):
    """`jax.jit` of the whole model traces the `inference` bool: say what to do."""
    x = _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=getkey(), train_kwarg="train")
    with pytest.raises(TypeError, match="(?s)`inference` field.*eqx.partition") as info:
        jax.jit(lambda m, x, s: m(x, s, key=jr.key(0)))(model, x, state)
    assert isinstance(info.value, adapters.AdapterError)
    # Without a mapped keyword the flag is unused, and plain jax.jit just works.
    dense, dense_state = adapters.to_equinox(nn.Dense(2), x, key=getkey())
    out, _ = jax.jit(lambda m, x, s: m(x, s))(dense, x, dense_state)
    chex.assert_trees_all_close(
        out, nn.Dense(2).apply(dense.linen_variables(dense_state), x)
    )


def test_filter_jit_does_not_retrace(getkey):
    x = _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=getkey(), train_kwarg="train")

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, x, state, key):
        return model(x, state, key=key)

    for i in range(4):
        _, state = step(model, x + i, state, jr.key(i))


def test_jax_checkpoint(getkey):
    x = _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=getkey(), train_kwarg="train")
    variables = model.linen_variables(state)
    dkey = getkey()

    @eqx.filter_grad
    def grad_remat(model):
        arrays, static = eqx.partition(model, eqx.is_array)

        @jax.checkpoint
        def f(arrays):
            out, _ = eqx.combine(arrays, static)(x, state, key=dkey)
            return jnp.sum(out**2)

        return f(arrays)

    def native(params):
        out, _ = Block().apply(
            {**variables, "params": params},
            x,
            train=True,
            rngs=adapters.linen_rngs(dkey),
            mutable=["batch_stats"],
        )
        return jnp.sum(out**2)

    chex.assert_trees_all_close(
        grad_remat(model).variables["params"],
        jax.grad(native)(variables["params"]),
        rtol=1e-5,
    )


def test_per_example_vmap_with_axis_name(getkey):
    """As for `eqx.nn.BatchNorm`: `vmap` over examples, state unmapped, and a linen
    BatchNorm with `axis_name` computes statistics across the batch."""

    class Norm(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x, train: bool):
            return nn.BatchNorm(
                use_running_average=not train, axis_name=self.axis_name
            )(x)

    x = _x(getkey(), (8, 3)) * 3 + 1
    model, state = adapters.to_equinox(
        Norm("batch"), x[0], key=getkey(), train_kwarg="train"
    )
    variables = model.linen_variables(state)
    out, new_state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    # Native linen on the whole batch, without axis_name, computes the same thing.
    native, updates = Norm().apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats"],
    )
    chex.assert_trees_all_close(out, native, atol=1e-5)
    chex.assert_trees_all_close(
        new_state.get(model.state_indices["batch_stats"]),
        updates["batch_stats"],
        atol=1e-6,
    )


def test_partitioned_params_compute(getkey):
    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param(
                "kernel",
                nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
                (x.shape[-1], 4),
            )
            return x @ kernel

    x = _x(getkey())
    model, state = adapters.to_equinox(Sharded(), x, key=getkey())
    box = model.variables["params"]["kernel"]
    assert isinstance(box, nn.Partitioned)
    assert box.names == (None, "model")
    out, _ = model(x, state)
    chex.assert_trees_all_equal(out, Sharded().apply(model.linen_variables(state), x))


def test_capture_returns_and_does_not_accumulate(getkey):
    class Sows(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(3)(x)
            self.sow("intermediates", "h", h)
            return nn.relu(h)

    x = _x(getkey())
    model, state = adapters.to_equinox(Sows(), x, key=getkey())
    variables = model.linen_variables(state)
    assert "intermediates" not in variables  # linen's init leaves it out too
    (out, captured), state = model(x, state, capture="intermediates")
    (out, captured), state = model(x, state, capture=("intermediates",))
    native, native_captured = Sows().apply(variables, x, mutable=["intermediates"])
    chex.assert_trees_all_equal(out, native)
    chex.assert_trees_all_equal(captured, native_captured)
    assert len(captured["intermediates"]["h"]) == 1
    # Without capture, the output is the plain one (as linen without mutable=).
    out, _ = model(x, state)
    chex.assert_trees_all_equal(out, native)


def test_other_methods(getkey):
    class AutoEncoder(nn.Module):
        def setup(self):
            self.enc = nn.Dense(2)
            self.dec = nn.Dense(3)

        def encode(self, x):
            return self.enc(x)

        def decode(self, z):
            return self.dec(z)

        def __call__(self, x):
            return self.decode(self.encode(x))

    x = _x(getkey())
    model, state = adapters.to_equinox(AutoEncoder(), x, key=getkey())
    variables = model.linen_variables(state)
    z, state = model(x, state, method="encode")
    chex.assert_trees_all_equal(
        z, AutoEncoder().apply(variables, x, method=AutoEncoder.encode)
    )
    y, state = model(z, state, method=AutoEncoder.decode)
    chex.assert_trees_all_equal(y, AutoEncoder().apply(variables, z, method="decode"))


def test_init_method(getkey):
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="big")(x)

        @nn.compact
        def small(self, x):
            return nn.Dense(1, name="small")(x)

    x, key = _x(getkey()), getkey()
    model, state = adapters.to_equinox(Two(), x, key=key, init_method="small")
    native = Two().init(
        adapters.linen_rngs(key, ("params", "dropout")), x, method="small"
    )
    chex.assert_trees_all_equal(model.linen_variables(state), native)


def test_existing_variables_are_validated_and_accepted(getkey):
    x = _x(getkey())
    variables = Block().init(jr.key(0), x, train=False)
    model, state = adapters.to_equinox(
        Block(), x, variables=variables, train_kwarg="train"
    )
    chex.assert_trees_all_equal(model.linen_variables(state), variables)
    with pytest.raises(adapters.AdapterError, match="BatchNorm_0/mean"):
        adapters.to_equinox(
            Block(features=7), x, variables=variables, train_kwarg="train"
        )


def test_unhashable_module_under_filter_jit(getkey):
    """`nn.Sequential` holds a list: the adapter still caches the compiled call."""
    seq = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(1)])
    x = _x(getkey())
    model, state = adapters.to_equinox(seq, x, key=getkey())

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def call(model, x, state):
        return model(x, state)

    out, state = call(model, x, state)
    out, state = call(model, x, state)
    chex.assert_trees_all_equal(out, seq.apply(model.linen_variables(state), x))


def test_user_objects_are_not_mutated(getkey):
    x = _x(getkey())
    module = Block()
    variables = Block().init(jr.key(0), x, train=False)
    before = jax.tree.map(lambda a: a, variables)
    model, state = adapters.to_equinox(
        module, x, variables=variables, train_kwarg="train"
    )
    _, state = model(x, state, key=getkey())
    assert module.scope is None
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(variables), strict=True):
        assert a is b


def test_untouched_state_is_returned_as_is(getkey):
    """As `eqx.nn.BatchNorm` in inference mode: a call that updates nothing returns
    the very state it got, which therefore stays usable."""
    x = _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=getkey(), train_kwarg="train")
    inference = eqx.nn.inference_mode(model)
    out1, state1 = inference(x, state)
    out2, state2 = inference(x, state)  # the same state again: no "old state" error
    assert state1 is state and state2 is state
    chex.assert_trees_all_equal(out1, out2)
    _, trained = model(x, state, key=getkey())  # a real update makes a new state
    assert trained is not state


def test_mode_keyword_only_for_methods_that_take_it(getkey):
    class TwoMethods(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(3, name="dense")(x)
            return nn.Dropout(0.5, deterministic=not train)(x)

        def project(self, x):  # takes no `train`
            return x @ self.variables["params"]["dense"]["kernel"]

    x = _x(getkey())
    model, state = adapters.to_equinox(
        TwoMethods(), x, key=getkey(), train_kwarg="train"
    )
    out, state = model(x, state, method="project")
    chex.assert_trees_all_equal(
        out,
        TwoMethods().apply(model.linen_variables(state), x, method="project"),
    )


def test_mode_keyword_the_module_does_not_take(getkey):
    with pytest.raises(adapters.AdapterError, match="Dense.__call__ takes no keyword"):
        adapters.to_equinox(
            nn.Dense(2), _x(getkey()), key=getkey(), train_kwarg="trian"
        )


def test_linen_variables_are_fresh_dicts(getkey):
    """Editing the returned dict (say, swapping a head) never edits the model or
    the state; the arrays themselves are shared."""
    x = _x(getkey())
    model, state = adapters.to_equinox(Block(), x, key=getkey(), train_kwarg="train")
    variables = model.linen_variables(state)
    before = model.linen_variables(state)
    variables["params"]["Dense_1"] = {"kernel": jnp.zeros((5, 2)), "bias": 1}
    variables["batch_stats"]["BatchNorm_0"]["mean"] = jnp.full(5, 99.0)
    chex.assert_trees_all_equal(model.linen_variables(state), before)
    assert (
        model.variables["params"]["Dense_0"]["kernel"]
        is before["params"]["Dense_0"]["kernel"]
    )


def test_params_stream_can_be_declared(getkey):
    """A module that draws from `params` at apply needs the stream declared."""

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + jr.normal(self.make_rng("params"), x.shape)

    x = jnp.zeros(3)
    model, state = adapters.to_equinox(
        Noisy(), x, key=getkey(), rng_streams=("params",)
    )
    key = getkey()
    out, _ = model(x, state, key=key)
    native = Noisy().apply({}, x, rngs=adapters.linen_rngs(key, ("params",)))
    chex.assert_trees_all_equal(out, native)


def test_mode_keyword_given_positionally_wins(getkey):
    x = _x(getkey())
    model, state = adapters.to_equinox(
        Block(), x, False, key=getkey(), train_kwarg="train"
    )
    variables = model.linen_variables(state)
    out, _ = model(x, False, state)  # inference, positionally, despite training mode
    chex.assert_trees_all_equal(out, Block().apply(variables, x, False))
