"""Equivalence zoo for direction 2 (an Equinox model inside linen).

Every test runs an Equinox model twice: once through linen (`adapters.to_linen` /
`adapters.ToLinen` and linen's `apply`), and once natively in Equinox (the model
called directly, `jax.vmap`-ed over the batch the way an Equinox user would write
it), and compares the two with chex. Nothing is compared against the adapter
itself, and no number is hard-coded.

Eager calls that run the same computation must be bit-identical
(`assert_trees_all_equal`); gradients and jitted programs may differ in the last
bits (`assert_trees_all_close`). Where a comparison could pass vacuously (a state
update that changes nothing, an inference mode that does nothing), a sanity check
asserts that the native path really changes or differs.

Keys: when linen's `apply` gets `rngs={"dropout": k}`, `ToLinen` passes the model
`self.make_rng("dropout")`, i.e. linen's own key for that stream at the module's
scope (derived from `k`, not `k` itself), split once per example under
`vmap_axis`. `stream_key` below computes that key with a bare linen module at the
same (top-level) scope.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from flax import traverse_util

import adapters


TOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


class _StreamKey(nn.Module):
    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


def stream_key(key):
    """Linen's `make_rng("dropout")` at the top-level scope of an `apply` given
    `rngs={"dropout": key}`: the key a top-level `ToLinen` hands its model."""
    return _StreamKey().apply({}, rngs={"dropout": key})


def clone(state):
    """A fresh `eqx.nn.State` with the same leaves: a native eager call consumes
    the state it is given (Equinox's guard against reuse)."""
    if state is None:
        return None
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def inexact(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


def array_leaves(tree):
    return jtu.tree_leaves(eqx.filter(tree, eqx.is_array))


def loss_of(out):
    return sum(jnp.sum(jnp.tanh(leaf) ** 2) for leaf in jtu.tree_leaves(out))


def model_paths(model):
    """The `/`-joined paths of the model's inexact arrays, from JAX's key paths."""
    names = set()
    flat, _ = jtu.tree_flatten_with_path(inexact(model))
    for path, _leaf in flat:
        parts = []
        for entry in path:
            if isinstance(entry, jtu.GetAttrKey):
                parts.append(entry.name)
            elif isinstance(entry, jtu.SequenceKey):
                parts.append(str(entry.idx))
            else:
                raise AssertionError(f"unexpected path entry {entry!r}")
        names.add("/".join(parts))
    return names


def assert_not_close(a, b):
    flat_a = np.concatenate([np.ravel(x) for x in jtu.tree_leaves(a)])
    flat_b = np.concatenate([np.ravel(x) for x in jtu.tree_leaves(b)])
    assert not np.allclose(flat_a, flat_b), "sanity check: expected a difference"


# Native Equinox calls, `(model, state, args, key) -> (out, state or None)`.


def per_example(model, state, args, key):
    return model(*args), None


def per_example_stateful(model, state, args, key):
    return model(*args, state)


def batched(model, state, args, key):
    return jax.vmap(model)(*args), None


def batched_stateful(axis_name):
    def native(model, state, args, key):
        mapped = jax.vmap(
            model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None)
        )
        return mapped(*args, state)

    return native


def batched_with_keys(model, state, args, key):
    keys = jr.split(key, args[0].shape[0])
    return jax.vmap(lambda x, k: model(x, key=k))(args[0], keys), None


# --------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    model: Any
    state: Any
    args: tuple
    native: Callable
    vmap_axis: int | None = None
    axis_name: str | None = None
    uses_key: bool = False
    # inference=True really changes the output (so comparing it is not vacuous);
    # not so for SpectralNorm, whose power iteration has converged after one step
    inference_differs: bool = False

    def to_linen(self):
        return adapters.to_linen(
            self.model, self.state, vmap_axis=self.vmap_axis, axis_name=self.axis_name
        )

    def linen_apply(self, module, variables, key=None, args=None, **kwargs):
        """`(out, batch_stats updates or None)` from linen's `apply`."""
        args = self.args if args is None else args
        rngs = {"dropout": key} if self.uses_key else None
        if self.state is None:
            return module.apply(variables, *args, rngs=rngs, **kwargs), None
        out, updates = module.apply(
            variables, *args, rngs=rngs, mutable=["batch_stats"], **kwargs
        )
        return out, updates

    def native_call(self, model, state, key=None, args=None):
        args = self.args if args is None else args
        native_key = stream_key(key) if self.uses_key else None
        return self.native(model, clone(state), args, native_key)


def _linear(getkey):
    model = eqx.nn.Linear(3, 4, key=getkey())
    return Case(model, None, (jr.normal(getkey(), (3,)),), per_example)


def _linear_batched(getkey):
    model = eqx.nn.Linear(3, 4, key=getkey())
    return Case(model, None, (jr.normal(getkey(), (5, 3)),), batched, vmap_axis=0)


def _mlp(getkey):
    model = eqx.nn.MLP(3, 2, width_size=5, depth=2, key=getkey())
    return Case(model, None, (jr.normal(getkey(), (4, 3)),), batched, vmap_axis=0)


def _conv2d(getkey):
    model = eqx.nn.Conv2d(2, 3, kernel_size=3, padding=1, key=getkey())
    return Case(model, None, (jr.normal(getkey(), (2, 6, 6)),), per_example)


def _conv2d_batched(getkey):
    model = eqx.nn.Conv2d(2, 3, kernel_size=3, padding=1, key=getkey())
    x = jr.normal(getkey(), (3, 2, 6, 6))
    return Case(model, None, (x,), batched, vmap_axis=0)


def _batchnorm(mode):
    def build(getkey):
        model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, axis_name="batch", mode=mode
        )
        # non-trivial affine parameters, so that their gradients mean something
        model = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            model,
            (jr.normal(getkey(), (3,)), jr.normal(getkey(), (3,))),
        )
        x = 2.0 + 3.0 * jr.normal(getkey(), (6, 3, 2))
        return Case(
            model,
            state,
            (x,),
            batched_stateful("batch"),
            vmap_axis=0,
            axis_name="batch",
            inference_differs=True,
        )

    return build


def _spectral_norm(getkey):
    model, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        eqx.nn.Linear(3, 4, key=getkey()), "weight", key=getkey()
    )
    x = jr.normal(getkey(), (3,))
    return Case(model, state, (x,), per_example_stateful)


def _spectral_norm_batched(getkey):
    model, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        eqx.nn.Linear(3, 4, key=getkey()), "weight", key=getkey()
    )
    x = jr.normal(getkey(), (5, 3))
    return Case(
        model,
        state,
        (x,),
        batched_stateful(None),
        vmap_axis=0,
    )


def _layernorm(getkey):
    model = eqx.nn.LayerNorm(5)
    model = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        model,
        (jr.normal(getkey(), (5,)), jr.normal(getkey(), (5,))),
    )
    return Case(model, None, (jr.normal(getkey(), (4, 5)),), batched, vmap_axis=0)


def _dropout(getkey):
    model = eqx.nn.Dropout(0.5)
    x = jnp.ones((4, 6))  # equal rows: per-example keys must give different masks
    return Case(
        model,
        None,
        (x,),
        batched_with_keys,
        vmap_axis=0,
        uses_key=True,
        inference_differs=True,
    )


def _sequential_dropout(getkey):
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(3, 6, key=getkey()),
            eqx.nn.Dropout(0.5),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(6, 2, key=getkey()),
        ]
    )
    x = jr.normal(getkey(), (4, 3))
    return Case(
        model,
        None,
        (x,),
        batched_with_keys,
        vmap_axis=0,
        uses_key=True,
        inference_differs=True,
    )


def _attention(getkey):
    model = eqx.nn.MultiheadAttention(num_heads=2, query_size=4, key=getkey())
    q = jr.normal(getkey(), (2, 3, 4))
    k = jr.normal(getkey(), (2, 5, 4))
    v = jr.normal(getkey(), (2, 5, 4))
    return Case(model, None, (q, k, v), batched, vmap_axis=0)


def _gru(getkey):
    model = eqx.nn.GRUCell(3, 4, key=getkey())
    x = jr.normal(getkey(), (2, 3))
    h = jr.normal(getkey(), (2, 4))
    return Case(model, None, (x, h), batched, vmap_axis=0)


def _embedding(getkey):
    model = eqx.nn.Embedding(7, 3, key=getkey())
    idx = jnp.array([0, 3, 6, 3, 1], dtype=jnp.int32)
    return Case(model, None, (idx,), batched, vmap_axis=0)


def _sequential_batchnorm(getkey):
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 4, key=getkey()),
            eqx.nn.BatchNorm(4, axis_name="batch", mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
        ]
    )
    x = 1.0 + 2.0 * jr.normal(getkey(), (6, 3))
    return Case(
        model,
        state,
        (x,),
        batched_stateful("batch"),
        vmap_axis=0,
        axis_name="batch",
        inference_differs=True,
    )


ZOO = {
    "linear": _linear,
    "linear_batched": _linear_batched,
    "mlp": _mlp,
    "conv2d": _conv2d,
    "conv2d_batched": _conv2d_batched,
    "batchnorm_batch": _batchnorm("batch"),
    "batchnorm_ema": _batchnorm("ema"),
    "spectral_norm": _spectral_norm,
    "spectral_norm_batched": _spectral_norm_batched,
    "layernorm": _layernorm,
    "dropout": _dropout,
    "sequential_dropout": _sequential_dropout,
    "attention": _attention,
    "gru": _gru,
    "embedding": _embedding,
    "sequential_batchnorm": _sequential_batchnorm,
}
STATEFUL = [n for n in ZOO if "batchnorm" in n or "spectral" in n]
WITH_PARAMS = [n for n in ZOO if n != "dropout"]


@pytest.fixture(params=list(ZOO))
def case(request, getkey):
    return ZOO[request.param](getkey)


# --------------------------------------------------------------------------------------
# (1) outputs, (3) state updates
# --------------------------------------------------------------------------------------


def test_outputs_and_state_updates(case, getkey):
    module, variables = case.to_linen()
    key = getkey()
    out, updates = case.linen_apply(module, variables, key)
    expected, expected_state = case.native_call(case.model, case.state, key)
    chex.assert_trees_all_equal(out, expected)
    if case.state is None:
        assert updates is None
        return
    assert set(updates) == {"batch_stats"}
    _, new_state = module.equinox_model({**variables, **updates})
    chex.assert_trees_all_equal(new_state, expected_state)
    assert_not_close(expected_state, case.state)  # the update is not vacuous


def test_outputs_under_jit(case, getkey):
    module, variables = case.to_linen()
    key = getkey()
    out, updates = jax.jit(lambda v, k: case.linen_apply(module, v, k))(variables, key)
    native_key = stream_key(key) if case.uses_key else None

    @eqx.filter_jit
    def native(model, state, args, k):
        return case.native(model, state, args, k)

    expected, expected_state = native(case.model, case.state, case.args, native_key)
    chex.assert_trees_all_close(out, expected, **TOL)
    if case.state is not None:
        _, new_state = module.equinox_model({**variables, **updates})
        chex.assert_trees_all_close(new_state, expected_state, **TOL)


def test_new_inputs(case, getkey):
    """The same module applied to other inputs (same shapes) still matches."""
    module, variables = case.to_linen()
    args = tuple(
        jr.permutation(getkey(), a, axis=-1) if a.ndim > 0 else a for a in case.args
    )
    key = getkey()
    out, _ = case.linen_apply(module, variables, key, args=args)
    expected, _ = case.native_call(case.model, case.state, key, args=args)
    chex.assert_trees_all_equal(out, expected)


def test_inference_mode(case, getkey):
    """`inference=True` is native `eqx.nn.inference_mode`, and never updates the
    state, so it needs no mutable collection. Stateful models are first trained one
    step on other inputs (through linen and natively), so that their state is
    neither the initial one nor the statistics of the inputs compared."""
    module, variables = case.to_linen()
    model, state = case.model, case.state
    if state is not None:  # a training step on other inputs
        warm = tuple(0.5 * a + 1.0 for a in case.args)
        _, updates = case.linen_apply(module, variables, args=warm)
        variables = {**variables, **updates}
        _, state = case.native_call(model, state, args=warm)
    key = getkey()
    rngs = {"dropout": key} if case.uses_key else None
    out = module.apply(variables, *case.args, inference=True, rngs=rngs)
    native_model = eqx.nn.inference_mode(model)
    expected, expected_state = case.native_call(native_model, state, key)
    chex.assert_trees_all_equal(out, expected)
    if state is not None:
        # no state update: what comes back in the mutable collection is what went in
        out2, updates = module.apply(
            variables, *case.args, inference=True, mutable=["batch_stats"]
        )
        chex.assert_trees_all_equal(out2, expected)
        chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
        chex.assert_trees_all_equal(expected_state, state)
    if case.inference_differs:
        training, _ = case.native_call(model, state, key)
        assert_not_close(expected, training)
    # and inference=False is training mode
    out_train, _ = case.linen_apply(module, variables, key, inference=False)
    expected_train, _ = case.native_call(
        eqx.nn.inference_mode(model, False), state, key
    )
    chex.assert_trees_all_equal(out_train, expected_train)


def test_stateful_training_needs_mutable(getkey):
    case = _batchnorm("batch")(getkey)
    module, variables = case.to_linen()
    with pytest.raises(adapters.AdapterError, match="mutable"):
        module.apply(variables, *case.args)


def test_dropout_keys_per_example(getkey):
    """With `vmap_axis=0` each example gets its own key (different masks on equal
    rows), and the same `rngs` give the same masks."""
    case = _dropout(getkey)
    module, variables = case.to_linen()
    key = getkey()
    out = module.apply(variables, *case.args, rngs={"dropout": key})
    again = module.apply(variables, *case.args, rngs={"dropout": key})
    other = module.apply(variables, *case.args, rngs={"dropout": getkey()})
    chex.assert_trees_all_equal(out, again)
    assert_not_close(out, other)
    rows = np.asarray(out)
    assert any(not np.array_equal(rows[0], r) for r in rows[1:])
    assert {0.0, 2.0} == set(np.unique(rows).tolist())


# --------------------------------------------------------------------------------------
# (2) gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_PARAMS)
def test_gradients(name, getkey):
    case = ZOO[name](getkey)
    module, variables = case.to_linen()
    key = getkey()

    def linen_loss(params):
        out, _ = case.linen_apply(module, {**variables, "params": params}, key)
        return loss_of(out)

    def native_loss(model):
        out, _ = case.native_call(model, case.state, key)
        return loss_of(out)

    grads = jax.grad(linen_loss)(variables["params"])
    grads_model, _ = module.equinox_model({**variables, "params": grads})
    expected = eqx.filter_grad(native_loss)(case.model)
    chex.assert_trees_all_close(inexact(grads_model), inexact(expected), **TOL)
    # not vacuous: some gradient is non-zero
    assert any(np.any(np.asarray(g) != 0) for g in jtu.tree_leaves(grads))


# --------------------------------------------------------------------------------------
# (4) round trip, (5) naming
# --------------------------------------------------------------------------------------


def test_round_trip_shares_buffers(case):
    module, variables = case.to_linen()
    model, state = module.equinox_model(variables)
    assert eqx.tree_equal(model, case.model)
    assert jtu.tree_structure(model) == jtu.tree_structure(case.model)
    got, want = array_leaves(model), array_leaves(case.model)
    assert len(got) == len(want)
    assert all(a is b for a, b in zip(got, want))
    if case.state is None:
        assert state is None
    else:
        assert isinstance(state, eqx.nn.State)
        chex.assert_trees_all_equal(state, case.state)
        got, want = jtu.tree_leaves(state), jtu.tree_leaves(case.state)
        assert len(got) == len(want)
        assert all(a is b for a, b in zip(got, want))
        # the round-tripped model and state work natively, and as the original does
        out, _ = case.native(model, clone(state), case.args, None)
        expected, _ = case.native(case.model, clone(case.state), case.args, None)
        chex.assert_trees_all_equal(out, expected)


def test_round_trip_after_update_shares_buffers(getkey):
    case = _sequential_batchnorm(getkey)
    module, variables = case.to_linen()
    _, updates = case.linen_apply(module, variables)
    _, state = module.equinox_model({**variables, **updates})
    flat = traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    counter = state.get(case.model.layers[1].batch_counter)
    assert counter is flat["layers/1/batch_counter"]
    mean, var = state.get(case.model.layers[1].batch_state_index)
    assert mean is flat["layers/1/batch_state_index"][0]
    assert var is flat["layers/1/batch_state_index"][1]


def test_params_named_by_model_paths(case):
    module, variables = case.to_linen()
    flat = traverse_util.flatten_dict(variables.get("params", {}), sep="/")
    assert set(flat) == model_paths(case.model)
    # each entry is the model's own array at that path
    flat_model, _ = jtu.tree_flatten_with_path(inexact(case.model))
    for path, leaf in flat_model:
        name = "/".join(
            e.name if isinstance(e, jtu.GetAttrKey) else str(e.idx) for e in path
        )
        assert flat[name] is leaf
    assert "constants" not in variables  # no integer buffers in this zoo


def test_names_by_hand(getkey):
    mlp = _mlp(getkey).model
    _, variables = adapters.to_linen(mlp)
    params = variables["params"]
    assert params["layers"]["0"]["weight"] is mlp.layers[0].weight
    assert params["layers"]["2"]["bias"] is mlp.layers[2].bias
    assert set(variables) == {"params"}

    case = _batchnorm("batch")(getkey)
    _, variables = case.to_linen()
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"weight", "bias"}
    mean, var = variables["batch_stats"]["batch_state_index"]
    want_mean, want_var = case.state.get(case.model.batch_state_index)
    assert mean is want_mean and var is want_var
    assert variables["batch_stats"]["batch_counter"] is case.state.get(
        case.model.batch_counter
    )

    case = _batchnorm("ema")(getkey)
    _, variables = case.to_linen()
    assert set(variables["batch_stats"]) == {"ema_first_time_index", "ema_state_index"}

    case = _spectral_norm(getkey)
    _, variables = case.to_linen()
    assert variables["params"]["layer"]["weight"] is case.model.layer.weight
    u, v = variables["batch_stats"]["uv_index"]
    assert (u, v) == case.state.get(case.model.uv_index)

    case = _sequential_batchnorm(getkey)
    _, variables = case.to_linen()
    flat = traverse_util.flatten_dict(variables, sep="/")
    assert set(flat) == {
        "params/layers/0/weight",
        "params/layers/0/bias",
        "params/layers/1/weight",
        "params/layers/1/bias",
        "batch_stats/layers/1/batch_counter",
        "batch_stats/layers/1/batch_state_index",
    }

    case = _attention(getkey)
    _, variables = case.to_linen()
    assert set(variables["params"]) == {
        "query_proj",
        "key_proj",
        "value_proj",
        "output_proj",
    }
    assert variables["params"]["query_proj"]["weight"] is case.model.query_proj.weight

    case = _gru(getkey)
    _, variables = case.to_linen()
    assert set(variables["params"]) == {"weight_ih", "weight_hh", "bias", "bias_n"}


class _Gather(eqx.Module):
    """A model with an integer buffer: it goes to `constants`, not `params`."""

    linear: eqx.nn.Linear
    index: jax.Array

    def __call__(self, x):
        return self.linear(x)[self.index]


def test_integer_buffer_is_a_constant(getkey):
    model = _Gather(
        eqx.nn.Linear(3, 4, key=getkey()), jnp.array([3, 0, 0], dtype=jnp.int32)
    )
    x = jr.normal(getkey(), (2, 3))
    module, variables = adapters.to_linen(model, vmap_axis=0)
    assert set(variables) == {"params", "constants"}
    assert variables["constants"]["index"] is model.index
    assert set(traverse_util.flatten_dict(variables["params"], sep="/")) == {
        "linear/weight",
        "linear/bias",
    }
    chex.assert_trees_all_equal(module.apply(variables, x), jax.vmap(model)(x))

    grads = jax.grad(lambda p: loss_of(module.apply({**variables, "params": p}, x)))(
        variables["params"]
    )
    grads_model, _ = module.equinox_model({**variables, "params": grads})
    expected = eqx.filter_grad(lambda m: loss_of(jax.vmap(m)(x)))(model)
    chex.assert_trees_all_close(inexact(grads_model), inexact(expected), **TOL)
    back, _ = module.equinox_model(variables)
    assert back.index is model.index


def test_optax_mask_by_name(getkey):
    """A mask built by name with `flax.traverse_util` trains only the weights."""
    case = _mlp(getkey)
    module, variables = case.to_linen()
    params = variables["params"]
    flat = traverse_util.flatten_dict(params)
    mask = traverse_util.unflatten_dict({k: k[-1] == "weight" for k in flat})

    def loss(p):
        return loss_of(module.apply({"params": p}, *case.args))

    grads = jax.grad(loss)(params)

    # optax.masked: sgd on the weights, other updates passed through untouched
    tx = optax.masked(optax.sgd(1.0), mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat_updates = traverse_util.flatten_dict(updates)
    flat_grads = traverse_util.flatten_dict(grads)
    for k in flat:
        if k[-1] == "weight":
            chex.assert_trees_all_close(flat_updates[k], -flat_grads[k], **TOL)
        else:
            assert flat_updates[k] is flat_grads[k]

    # frozen biases, trained weights: compare with the same update made natively
    tx = optax.multi_transform({True: optax.sgd(1.0), False: optax.set_to_zero()}, mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_model, _ = module.equinox_model(
        {"params": optax.apply_updates(params, updates)}
    )

    native_grads = eqx.filter_grad(
        lambda m: loss_of(case.native(m, None, case.args, None)[0])
    )(case.model)
    expected = eqx.tree_at(
        lambda m: [layer.weight for layer in m.layers],
        case.model,
        [
            layer.weight - g.weight
            for layer, g in zip(case.model.layers, native_grads.layers)
        ],
    )
    chex.assert_trees_all_close(inexact(new_model), inexact(expected), **TOL)
    for new, old in zip(new_model.layers, case.model.layers):
        assert new.bias is not None
        chex.assert_trees_all_equal(new.bias, old.bias)
        assert_not_close(new.weight, old.weight)


# --------------------------------------------------------------------------------------
# Training trajectories
# --------------------------------------------------------------------------------------


def _bn_mlp(key):
    k1, k2 = jr.split(key)
    return eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 8, key=k1),
            eqx.nn.BatchNorm(8, axis_name="batch", mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(8, 1, key=k2),
        ]
    )


def test_adam_trajectory_stateful(getkey):
    model, state = _bn_mlp(getkey())
    x = jr.normal(getkey(), (8, 3))
    y = jnp.sin(jnp.sum(x, axis=1, keepdims=True))
    tx = optax.adam(1e-2)

    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")

    @jax.jit
    def linen_step(params, batch_stats, opt_state):
        def loss_fn(p):
            out, upd = module.apply(
                {"params": p, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            return jnp.mean((out - y) ** 2), upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @eqx.filter_jit
    def eqx_step(model, state, opt_state):
        def loss_fn(m, s):
            mapped = jax.vmap(
                m, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )
            out, s = mapped(x, s)
            return jnp.mean((out - y) ** 2), s

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, state
        )
        updates, opt_state = tx.update(grads, opt_state, inexact(model))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    linen_opt = tx.init(params)
    eqx_opt = tx.init(inexact(model))
    losses = []
    for _ in range(5):
        params, batch_stats, linen_opt, linen_loss = linen_step(
            params, batch_stats, linen_opt
        )
        model, state, eqx_opt, eqx_loss = eqx_step(model, state, eqx_opt)
        chex.assert_trees_all_close(linen_loss, eqx_loss, **TOL)
        got_model, got_state = module.equinox_model(
            {"params": params, "batch_stats": batch_stats}
        )
        chex.assert_trees_all_close(inexact(got_model), inexact(model), **TOL)
        chex.assert_trees_all_close(got_state, state, **TOL)
        losses.append(float(eqx_loss))
    assert losses[-1] < losses[0]
    assert int(state.get(model.layers[1].batch_counter)) == 5


def _block_factory(key):
    return _bn_mlp(key)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(3)(x)
        block = adapters.ToLinen(make=_block_factory, vmap_axis=0, axis_name="batch")
        x = block(x, inference=not train)
        return nn.Dense(1)(x)


def _block_variables(variables):
    return {c: v["ToLinen_0"] for c, v in variables.items() if "ToLinen_0" in v}


def _native_block(block_variables):
    block = adapters.ToLinen(make=_block_factory, vmap_axis=0, axis_name="batch")
    return block.equinox_model(block_variables)


def test_factory_block_in_linen_trains(getkey):
    x = jr.normal(getkey(), (8, 5))
    y = jnp.cos(jnp.sum(x, axis=1, keepdims=True))
    net = _Net()
    variables = net.init(getkey(), x, train=True)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"Dense_0", "ToLinen_0", "Dense_1"}
    assert set(variables["batch_stats"]) == {"ToLinen_0"}
    # the factory's model, with its arrays from linen's `params` stream
    flat = traverse_util.flatten_dict(variables["params"]["ToLinen_0"], sep="/")
    template, _ = _block_factory(jr.key(0))
    assert set(flat) == model_paths(template)

    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(p):
            out, upd = net.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((out - y) ** 2), upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    losses = []
    for _ in range(5):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    variables = {"params": params, "batch_stats": batch_stats}

    # the block inside the trained net is the native Equinox block on its weights
    for train in (True, False):
        out, state = net.apply(
            variables,
            x,
            train=train,
            capture_intermediates=True,
            mutable=["batch_stats", "intermediates"],
        )
        inter = state["intermediates"]
        hidden = inter["Dense_0"]["__call__"][0]
        block_out = inter["ToLinen_0"]["__call__"][0]
        model, bstate = _native_block(_block_variables(variables))
        assert isinstance(model, eqx.nn.Sequential)
        if not train:
            model = eqx.nn.inference_mode(model)
        mapped = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )
        expected, expected_state = mapped(hidden, bstate)
        chex.assert_trees_all_equal(block_out, expected)
        _, new_state = _native_block(
            _block_variables({**variables, "batch_stats": state["batch_stats"]})
        )
        chex.assert_trees_all_equal(new_state, expected_state)
        expected_out = nn.Dense(1).apply({"params": params["Dense_1"]}, expected)
        chex.assert_trees_all_close(out, expected_out, **TOL)


def _mlp_block(key):
    return eqx.nn.MLP(3, 4, width_size=8, depth=1, key=key)


class _TabNet(nn.Module):
    make: Callable

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3)(x)
        block = adapters.ToLinen(make=self.make, vmap_axis=0, axis_name="batch")
        x = block(x, inference=False)
        return nn.Dense(1)(x)


def _total_parameters(table):
    table = re.sub(r"\x1b\[[0-9;]*m", "", table)
    return int(re.search(r"Total Parameters: ([0-9,]+)", table)[1].replace(",", ""))


def test_tabulate(getkey):
    x = jnp.ones((4, 5))
    table = nn.tabulate(_TabNet(_mlp_block), getkey())(x)
    assert "ToLinen_0" in table and "Dense_0" in table
    n_block = sum(a.size for a in jtu.tree_leaves(inexact(_mlp_block(jr.key(0)))))
    assert _total_parameters(table) == n_block + (5 * 3 + 3) + (4 * 1 + 1)


def test_tabulate_stateful(getkey):
    x = jnp.ones((4, 5))
    table = nn.tabulate(_TabNet(_block_factory), getkey())(x)
    assert "ToLinen_0" in table


# --------------------------------------------------------------------------------------
# Linen transforms over ToLinen
# --------------------------------------------------------------------------------------


def test_nn_vmap_over_to_linen(getkey):
    model = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=getkey())
    x = jr.normal(getkey(), (5, 3))
    vmapped = nn.vmap(
        adapters.ToLinen,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None},
        split_rngs={"params": False},
    )(model=model)
    variables = vmapped.init(getkey(), x)
    chex.assert_trees_all_equal(
        variables["params"], adapters.to_linen(model)[1]["params"]
    )
    out = vmapped.apply(variables, x)
    chex.assert_trees_all_equal(out, jax.vmap(model)(x))


def test_nn_vmap_batchnorm_axis_name(getkey):
    """`nn.vmap` with an `axis_name` in place of `vmap_axis`: the state is broadcast
    and BatchNorm reduces over linen's mapped axis."""
    case = _batchnorm("batch")(getkey)
    vmapped = nn.vmap(
        adapters.ToLinen,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(model=case.model, state=case.state)
    _, variables = adapters.to_linen(case.model, case.state)
    out, updates = vmapped.apply(variables, *case.args, mutable=["batch_stats"])
    expected, expected_state = case.native_call(case.model, case.state)
    chex.assert_trees_all_equal(out, expected)
    module, _ = adapters.to_linen(case.model, case.state)
    _, new_state = module.equinox_model({**variables, **updates})
    chex.assert_trees_all_equal(new_state, expected_state)


class _GRUStep(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        cell = adapters.ToLinen(make=lambda key: eqx.nn.GRUCell(3, 4, key=key))
        h = cell(x, h)
        return h, h


def test_nn_scan_gru(getkey):
    xs = jr.normal(getkey(), (6, 3))
    h0 = jr.normal(getkey(), (4,))
    scan = nn.scan(
        _GRUStep,
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=0,
        out_axes=0,
    )()
    variables = scan.init(getkey(), h0, xs)
    cell_variables = {"params": variables["params"]["ToLinen_0"]}
    cell, _ = adapters.ToLinen(
        make=lambda key: eqx.nn.GRUCell(3, 4, key=key)
    ).equinox_model(cell_variables)
    assert isinstance(cell, eqx.nn.GRUCell)
    assert cell.weight_ih.shape == (12, 3)  # not stacked over time: broadcast

    def native_step(h, x):
        h = cell(x, h)
        return h, h

    (h, hs) = scan.apply(variables, h0, xs)
    want_h, want_hs = jax.lax.scan(native_step, h0, xs)
    chex.assert_trees_all_close(h, want_h, **TOL)
    chex.assert_trees_all_close(hs, want_hs, **TOL)

    # gradients through the scan, mapped back to the Equinox cell
    def linen_loss(p):
        return loss_of(scan.apply({"params": p}, h0, xs))

    def native_loss(c):
        return loss_of(jax.lax.scan(lambda h, x: (c(x, h),) * 2, h0, xs))

    grads = jax.grad(linen_loss)(variables["params"])
    grads_cell, _ = adapters.ToLinen(
        make=lambda key: eqx.nn.GRUCell(3, 4, key=key)
    ).equinox_model({"params": grads["ToLinen_0"]})
    expected = eqx.filter_grad(native_loss)(cell)
    chex.assert_trees_all_close(inexact(grads_cell), inexact(expected), **TOL)


# --------------------------------------------------------------------------------------
# Surprises
# --------------------------------------------------------------------------------------


def test_native_use_of_state_does_not_break_module(getkey):
    case = _spectral_norm(getkey)
    module, variables = case.to_linen()
    expected, _ = case.model(*case.args, case.state)  # consumes case.state natively
    out, _ = module.apply(variables, *case.args, mutable=["batch_stats"])
    chex.assert_trees_all_equal(out, expected)
