"""`ToLinen` refuses an `eqx.nn.State` that does not fit its Equinox model, by the
path of the `StateIndex`, before anything is computed, and leaves the caller's
model and state usable; the right state still computes what native Equinox does.

The states that do not fit share the model's `StateIndex` markers (so Equinox
itself would look them up): their entries have another width or dtype, as a state
restored without a target or cast by hand has. The first models are built
directly (not through `make_with_state`), so their indices still hold their
initial values, the record of the shapes the model expects. For models from
`make_with_state` (initial values deleted) the check derives the expected state of
Equinox's own `BatchNorm` and `SpectralNorm` from their fields; a user's own layer
there stays unchecked (pinned at the end).
"""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import adapters


class Block(eqx.Module):
    """Params and a BatchNorm (statistics across the vmapped axis "batch"), built
    directly: its `StateIndex`es keep their initial values."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def _native(model, x, state):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


def _wide(model, state):
    """The model's state with every vector entry 5 wide instead of 4: the same
    markers, as if restored from a checkpoint of a wider model."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(
        treedef, [jnp.zeros(5, x.dtype) if x.ndim else x for x in leaves]
    )


def _half(model, state):
    """The model's state cast to float16 as a whole (the integer counter too)."""
    return jax.tree.map(lambda x: x.astype(jnp.float16), state)


def _foreign(model, state):
    """The state of another `Block`: none of this model's entries."""
    return eqx.nn.State(Block(jr.key(1)))


_WIDE = (
    r"batch_stats/norm/batch_state_index/0: expected float32\[4\], got float32\[5\]"
    r"\n  batch_stats/norm/batch_state_index/1: expected float32\[4\], got float32\[5\]"
)
_HALF = (
    r"batch_stats/norm/batch_counter: expected int32\[\], got float16\[\]"
    r"\n  batch_stats/norm/batch_state_index/0: expected float32\[4\], got float16\[4\]"
)
_FIX = r"Pass the state\nmade together with this model by `eqx.nn.make_with_state`"
_MISSING = (
    r"does not hold the entry of the model's `eqx.nn.StateIndex` at "
    r"'norm/batch_counter': it was made for another model\. Pass the state made "
    r"together with this model\."
)

BAD = {
    "wide": (_wide, _WIDE + r"[\s\S]*" + _FIX),
    "half": (_half, _HALF + r"[\s\S]*" + _FIX),
    "foreign": (_foreign, _MISSING),
}


def _setup(getkey):
    model = Block(getkey())
    state = eqx.nn.State(model)
    x = jr.normal(getkey(), (6, 3))
    return model, state, x


def _assert_untouched(model, leaves, bad):
    """The caller's model still holds its arrays and initial values, and the
    refused state can still be read (no Equinox 'old state' guard tripped)."""
    assert all(a is b for a, b in zip(jtu.tree_leaves(model), leaves, strict=True))
    assert isinstance(model.norm.batch_state_index.init[0], jax.Array)
    jtu.tree_leaves(bad)  # raises on a consumed State
    if model.norm.batch_counter.marker in bad.tree_flatten()[1]:
        bad.get(model.norm.batch_counter)
        bad.get(model.norm.batch_state_index)


def _assert_matches_native(module, variables, model, state, x):
    out, updates = module.apply(variables, x, mutable=["batch_stats"])
    native, native_state = _native(model, x, state)
    chex.assert_trees_all_close(out, native)
    _, new_state = module.equinox_model({**variables, **updates})
    chex.assert_trees_all_close(
        jtu.tree_leaves(new_state), jtu.tree_leaves(native_state)
    )
    # The running statistics moved: the comparison is not of two initial states.
    assert not jnp.allclose(
        new_state.get(model.norm.batch_state_index)[0],
        state.get(model.norm.batch_state_index)[0],
    )


# (a) adapters.to_linen(model, state)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_to_linen_refuses_a_state_that_does_not_fit(getkey, kind):
    model, state, _ = _setup(getkey)
    make_bad, pattern = BAD[kind]
    bad = make_bad(model, state)
    leaves = jtu.tree_leaves(model)
    with pytest.raises(adapters.AdapterError, match=pattern) as info:
        adapters.to_linen(model, bad, vmap_axis=0, axis_name="batch")
    if kind != "foreign":
        assert str(info.value).startswith("`adapters.to_linen`: the `eqx.nn.State`")
    _assert_untouched(model, leaves, bad)


def test_to_linen_with_the_right_state_matches_native(getkey):
    model, state, x = _setup(getkey)
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    state.get(model.norm.batch_state_index)  # still usable
    _assert_matches_native(module, variables, model, state, x)


# (b) adapters.ToLinen(model=..., state=...) built by hand


@pytest.mark.parametrize("kind", sorted(BAD))
def test_hand_built_init_refuses_a_state_that_does_not_fit(getkey, kind):
    model, state, x = _setup(getkey)
    make_bad, pattern = BAD[kind]
    bad = make_bad(model, state)
    leaves = jtu.tree_leaves(model)
    module = adapters.ToLinen(model=model, state=bad, vmap_axis=0, axis_name="batch")
    with pytest.raises(adapters.AdapterError, match=pattern) as info:
        module.init(getkey(), x)
    if kind != "foreign":
        assert str(info.value).startswith("`ToLinen(model=...)`: the `eqx.nn.State`")
    _assert_untouched(model, leaves, bad)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_hand_built_apply_refuses_a_state_that_does_not_fit(getkey, kind):
    """Even with variables that fit, a module holding a wrong state is refused
    at apply (it would otherwise compute with shapes of another model)."""
    model, state, x = _setup(getkey)
    variables = adapters.to_linen(model, state)[1]
    make_bad, pattern = BAD[kind]
    bad = make_bad(model, state)
    leaves = jtu.tree_leaves(model)
    module = adapters.ToLinen(model=model, state=bad, vmap_axis=0, axis_name="batch")
    with pytest.raises(adapters.AdapterError, match=pattern):
        module.apply(variables, x, mutable=["batch_stats"])
    with pytest.raises(adapters.AdapterError, match=pattern):
        module.equinox_model(variables)
    _assert_untouched(model, leaves, bad)


def test_hand_built_with_the_right_state_matches_native(getkey):
    model, state, x = _setup(getkey)
    module = adapters.ToLinen(model=model, state=state, vmap_axis=0, axis_name="batch")
    variables = module.init(getkey(), x)
    chex.assert_trees_all_equal(
        variables["batch_stats"]["norm"]["batch_state_index"],
        state.get(model.norm.batch_state_index),
    )
    _assert_matches_native(module, variables, model, state, x)


# (c) adapters.ToLinen(make=...) returning (model, state)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_factory_refuses_a_state_that_does_not_fit(getkey, kind):
    model, state, x = _setup(getkey)
    make_bad, pattern = BAD[kind]
    bad = make_bad(model, state)
    leaves = jtu.tree_leaves(model)
    module = adapters.ToLinen(
        make=lambda key: (model, bad), vmap_axis=0, axis_name="batch"
    )
    with pytest.raises(adapters.AdapterError, match=pattern) as info:
        module.init(getkey(), x)
    if kind != "foreign":
        assert str(info.value).startswith("`ToLinen(make=...)`: the `eqx.nn.State`")
    # At apply the factory runs under `eqx.filter_eval_shape`: refused there too.
    variables = adapters.to_linen(model, state)[1]
    with pytest.raises(adapters.AdapterError, match=pattern):
        module.apply(variables, x, mutable=["batch_stats"])
    _assert_untouched(model, leaves, bad)


def test_factory_with_the_right_state_matches_native(getkey):
    model, state, x = _setup(getkey)
    module = adapters.ToLinen(
        make=lambda key: (model, state), vmap_axis=0, axis_name="batch"
    )
    variables = module.init(getkey(), x)
    state.get(model.norm.batch_state_index)  # still usable
    _assert_matches_native(module, variables, model, state, x)


# No false refusals


class Accumulate(eqx.Module):
    """A state entry whose initial value is numpy float64: `eqx.nn.State` stores
    it as JAX keeps it (float32 in 32-bit mode), and so must the check expect."""

    index: eqx.nn.StateIndex

    def __init__(self):
        self.index = eqx.nn.StateIndex(np.zeros(3))

    def __call__(self, x, state):
        total = state.get(self.index) + x
        return total, state.set(self.index, total)


def test_initial_value_is_expected_as_the_state_stores_it(getkey):
    model = Accumulate()
    state = eqx.nn.State(model)
    module, variables = adapters.to_linen(model, state)
    x = jr.normal(getkey(), (3,))
    out, updates = module.apply(variables, x, mutable=["batch_stats"])
    native, native_state = model(x, eqx.nn.State(model))
    chex.assert_trees_all_equal(out, native)
    chex.assert_trees_all_equal(
        updates["batch_stats"]["index"], native_state.get(model.index)
    )


def test_make_with_state_model_and_its_state_pass(getkey):
    """`make_with_state` deletes the initial values: nothing to compare shapes
    with, and the model's own state is accepted as before."""
    model, state = eqx.nn.make_with_state(Block)(getkey())
    x = jr.normal(getkey(), (6, 3))
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    out, _ = module.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(out, _native(model, x, state)[0])


def test_abstract_model_and_state(getkey):
    """An abstract model (initial values as `jax.ShapeDtypeStruct`s, from
    `eqx.filter_eval_shape`) is checked the same way, without compute."""

    def make():
        model = Block(jr.key(0))
        return model, eqx.nn.State(model)

    model, state = eqx.filter_eval_shape(make)
    assert isinstance(model.norm.batch_state_index.init[0], jax.ShapeDtypeStruct)
    _, variables = adapters.to_linen(model, state)
    assert variables["batch_stats"]["norm"]["batch_state_index"][0].shape == (4,)
    with pytest.raises(adapters.AdapterError, match=_WIDE):
        adapters.to_linen(model, _wide(model, state))


# Models from `eqx.nn.make_with_state`: their initial values are deleted, so for
# Equinox's own `BatchNorm` and `SpectralNorm` the expected state is derived from
# the layer's fields (the layer's constructor, under `eqx.filter_eval_shape`). The
# states that do not fit are those of the same layer built wider: `make_with_state`
# names the markers by path, so they coincide and Equinox's lookup succeeds.


def _batch_norm(width, **kwargs):
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        width, axis_name="batch", **{"mode": "batch", **kwargs}
    )


_BN_WIDE = (
    r"batch_stats/batch_state_index/0: expected float32\[4\], got float32\[5\]"
    r"\n  batch_stats/batch_state_index/1: expected float32\[4\], got float32\[5\]"
)


def _assert_deleted_and_usable(model, bad, index):
    """The caller's model still has its initial values deleted (no derived value
    written into it), and the refused state can still be read."""
    for x in jtu.tree_leaves(model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)):
        if isinstance(x, eqx.nn.StateIndex):
            assert not isinstance(x.init, (jax.Array, jax.ShapeDtypeStruct, tuple))
    jtu.tree_leaves(bad)  # raises on a consumed State
    assert bad.get(index)[0].shape == (5,)


def test_make_with_state_to_linen_refuses_a_wider_batch_norm_state():
    model, _ = _batch_norm(4)
    _, state5 = _batch_norm(5)
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE + r"[\s\S]*" + _FIX) as e:
        adapters.to_linen(model, state5, vmap_axis=0, axis_name="batch")
    assert str(e.value).startswith("`adapters.to_linen`: the `eqx.nn.State`")
    assert "batch_counter" not in str(e.value)  # int32[] in both: it fits
    _assert_deleted_and_usable(model, state5, model.batch_state_index)


def test_make_with_state_hand_built_refuses_a_wider_batch_norm_state(getkey):
    model, state = _batch_norm(4)
    _, state5 = _batch_norm(5)
    x = jr.normal(getkey(), (6, 4))
    module = adapters.ToLinen(model=model, state=state5, vmap_axis=0, axis_name="batch")
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE) as e:
        module.init(getkey(), x)
    assert str(e.value).startswith("`ToLinen(model=...)`: the `eqx.nn.State`")
    variables = adapters.to_linen(model, state)[1]  # variables that fit
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE):
        module.apply(variables, x, mutable=["batch_stats"])
    _assert_deleted_and_usable(model, state5, model.batch_state_index)


def test_make_with_state_factory_refuses_a_wider_batch_norm_state(getkey):
    model, state = _batch_norm(4)
    x = jr.normal(getkey(), (6, 4))
    module = adapters.ToLinen(
        make=lambda key: (_batch_norm(4)[0], _batch_norm(5)[1]),
        vmap_axis=0,
        axis_name="batch",
    )
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE) as e:
        module.init(getkey(), x)
    assert str(e.value).startswith("`ToLinen(make=...)`: the `eqx.nn.State`")
    # At apply the factory runs under `eqx.filter_eval_shape`: refused there too.
    variables = adapters.to_linen(model, state)[1]
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE):
        module.apply(variables, x, mutable=["batch_stats"])


def test_make_with_state_ema_mode_and_no_affine_are_checked_by_shape():
    """`mode="ema"` has other indices (a bool flag among them); with
    `channelwise_affine=False` there is no weight to tell the float dtype, and
    the shapes are still checked."""
    model, _ = _batch_norm(4, mode="ema")
    _, state5 = _batch_norm(5, mode="ema")
    pattern = r"batch_stats/ema_state_index/0: expected float32\[4\], got float32\[5\]"
    with pytest.raises(adapters.AdapterError, match=pattern) as e:
        adapters.to_linen(model, state5, vmap_axis=0, axis_name="batch")
    assert "ema_first_time_index" not in str(e.value)
    model, _ = _batch_norm(4, channelwise_affine=False)
    _, state5 = _batch_norm(5, channelwise_affine=False)
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE):
        adapters.to_linen(model, state5, vmap_axis=0, axis_name="batch")


def test_make_with_state_integer_counter_keeps_its_dtype():
    """The step counter's int32 follows from the layer's definition: a counter
    cast to float is refused, as for a model that holds its initial state."""
    model, state = _batch_norm(4)
    half = _half(model, state)
    pattern = r"batch_stats/batch_counter: expected int32\[\], got float16\[\]"
    with pytest.raises(adapters.AdapterError, match=pattern) as e:
        adapters.to_linen(model, half, vmap_axis=0, axis_name="batch")
    assert "batch_state_index" not in str(e.value)  # float dtypes: shapes only


class WideBlock(eqx.Module):
    """`Block` with a chosen width, built by `make_with_state` (markers by path)."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, width, key):
        self.linear = eqx.nn.Linear(3, width, key=key)
        self.norm = eqx.nn.BatchNorm(width, axis_name="batch", mode="batch")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def _sequential(width, key):
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(3, width, key=key),
            eqx.nn.BatchNorm(width, axis_name="batch", mode="batch"),
        ]
    )


NESTED = {
    "module": (WideBlock, "norm"),
    "sequential": (_sequential, "layers/1"),
}


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_make_with_state_nested_batch_norm_is_refused_by_its_path(getkey, kind):
    build, path = NESTED[kind]
    model, _ = eqx.nn.make_with_state(build)(4, getkey())
    _, state5 = eqx.nn.make_with_state(build)(5, getkey())
    pattern = (
        rf"batch_stats/{path}/batch_state_index/0: expected float32\[4\], "
        rf"got float32\[5\]"
    )
    with pytest.raises(adapters.AdapterError, match=pattern):
        adapters.to_linen(model, state5, vmap_axis=0, axis_name="batch")
    x = jr.normal(getkey(), (6, 3))
    module = adapters.ToLinen(model=model, state=state5, vmap_axis=0, axis_name="batch")
    with pytest.raises(adapters.AdapterError, match=pattern):
        module.init(getkey(), x)


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_make_with_state_nested_right_state_matches_native(getkey, kind):
    build, _ = NESTED[kind]
    model, state = eqx.nn.make_with_state(build)(4, getkey())
    x = jr.normal(getkey(), (6, 3))
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    out, updates = module.apply(variables, x, mutable=["batch_stats"])
    native, native_state = _native(model, x, state)
    chex.assert_trees_all_close(out, native)
    _, new_state = module.equinox_model({**variables, **updates})
    chex.assert_trees_all_close(
        jtu.tree_leaves(new_state), jtu.tree_leaves(native_state)
    )


def test_make_with_state_batch_norm_right_state_matches_native(getkey):
    model, state = _batch_norm(4)
    x = jr.normal(getkey(), (6, 4))
    for module, variables in [
        adapters.to_linen(model, state, vmap_axis=0, axis_name="batch"),
        (
            module := adapters.ToLinen(
                make=lambda key: _batch_norm(4), vmap_axis=0, axis_name="batch"
            ),
            module.init(getkey(), x),
        ),
    ]:
        out, updates = module.apply(variables, x, mutable=["batch_stats"])
        native, native_state = _native(model, x, state)
        chex.assert_trees_all_close(out, native)
        chex.assert_trees_all_close(
            updates["batch_stats"]["batch_state_index"],
            native_state.get(model.batch_state_index),
        )
        chex.assert_trees_all_equal(updates["batch_stats"]["batch_counter"], 1)


def test_make_with_state_mixed_precision_is_not_refused(getkey):
    """bfloat16 params with the float32 statistics `make_with_state` made: the
    model's float dtype is not the state's, and native Equinox runs it, so the
    derived check compares shapes only."""
    model, state = _batch_norm(4)
    model = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, model
    )
    x = jr.normal(getkey(), (6, 4))
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    out, _ = module.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(out, _native(model, x, state)[0])


def _spectral(width, key):
    return eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        eqx.nn.Linear(3, width, key=key), "weight", key=key
    )


def test_make_with_state_spectral_norm_refuses_another_shape(getkey):
    model, _ = _spectral(4, getkey())
    _, state5 = _spectral(5, getkey())
    pattern = r"batch_stats/uv_index/0: expected float32\[4\], got float32\[5\]"
    with pytest.raises(adapters.AdapterError, match=pattern) as e:
        adapters.to_linen(model, state5)
    assert "uv_index/1" not in str(e.value)  # v: 3 wide in both
    module = adapters.ToLinen(model=model, state=state5)
    with pytest.raises(adapters.AdapterError, match=pattern):
        module.init(getkey(), jnp.ones(3))
    _assert_deleted_and_usable(model, state5, model.uv_index)


def test_make_with_state_spectral_norm_right_state_matches_native(getkey):
    model, state = _spectral(4, getkey())
    x = jr.normal(getkey(), (3,))
    module, variables = adapters.to_linen(model, state)
    out, updates = module.apply(variables, x, mutable=["batch_stats"])
    native, native_state = model(x, state)
    chex.assert_trees_all_close(out, native)
    chex.assert_trees_all_close(
        updates["batch_stats"]["uv_index"], native_state.get(model.uv_index)
    )


def test_make_with_state_abstract_model_is_checked_without_values(getkey):
    """`eqx.filter_eval_shape` of `make_with_state`: no values anywhere, and the
    wider state is still refused."""
    model, _ = eqx.filter_eval_shape(lambda: _batch_norm(4))
    _, state5 = eqx.filter_eval_shape(lambda: _batch_norm(5))
    assert isinstance(model.weight, jax.ShapeDtypeStruct)
    with pytest.raises(adapters.AdapterError, match=_BN_WIDE):
        adapters.to_linen(model, state5)


class Accumulate4(eqx.Module):
    """A user's stateful layer: once `make_with_state` deletes its initial value,
    nothing records the shape of its state."""

    index: eqx.nn.StateIndex

    def __init__(self, width):
        self.index = eqx.nn.StateIndex(jnp.zeros(width))

    def __call__(self, x, state):
        total = state.get(self.index) + x
        return total, state.set(self.index, total)


def test_make_with_state_user_layer_stays_unchecked():
    """Pins the known gap: a user's layer from `make_with_state` with another
    layer's state is accepted, and fails inside the computation with JAX's own
    shape error."""
    model, _ = eqx.nn.make_with_state(Accumulate4)(4)
    _, state5 = eqx.nn.make_with_state(Accumulate4)(5)
    module, variables = adapters.to_linen(model, state5)
    with pytest.raises(TypeError, match="incompatible shapes for broadcasting"):
        module.apply(variables, jnp.ones(4), mutable=["batch_stats"])
