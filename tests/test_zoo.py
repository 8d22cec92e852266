"""Equivalence zoo: every test runs a linen module twice, once through the adapter
(`adapters.to_equinox` / `adapters.ToEquinox`) and once through linen's own
`init` / `apply` with the same variables and keys, and compares the two with chex.

Eager calls of the same linen `apply` on the same inputs must be bit-identical
(`assert_trees_all_equal`); gradients and jitted programs may differ in the last
bits (`assert_trees_all_close`). Where a comparison could pass vacuously (a state
update that does not change anything, two modes that give the same output), a
sanity check asserts that the native path really changes or differs, so that a
broken adapter (dropped update, wrong mode flag, wrong keys, stale state) fails.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import adapters


STREAMS = ("dropout",)
TOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Helpers: the native path, a scalar loss, sanity checks.
# --------------------------------------------------------------------------------------


def init_rngs(key):
    """The rngs the adapter gives linen's `init`: `("params", *rng_streams)`."""
    return adapters.linen_rngs(key, ("params", *STREAMS))


def call_rngs(key):
    """The rngs the adapter gives linen's `apply` for a call with `key=`."""
    return None if key is None else adapters.linen_rngs(key, STREAMS)


def native_apply(module, variables, args, key, mode, method=None):
    """Linen's own `apply`, with every non-`params` collection mutable (as the
    adapter does). Returns `(out, updated collections)`."""
    mutable = [c for c in variables if c != "params"]
    return module.apply(
        variables, *args, rngs=call_rngs(key), mutable=mutable, method=method, **mode
    )


def with_params(variables, params):
    return {**variables, "params": params} if "params" in variables else variables


def loss_of(out):
    """A scalar loss touching every float leaf of `out` (non-linear, so gradients
    depend on the values, not only on the structure)."""
    leaves = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.sum(jnp.stack([jnp.sum(jnp.sin(x)) for x in leaves]))


def non_params(variables):
    return {c: t for c, t in variables.items() if c != "params"}


def clone(state):
    """A copy of an `eqx.nn.State` that stays valid: Equinox invalidates a state
    object once it has been used to make a new one (`State.set`)."""
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)


def assert_trees_differ(a, b):
    """Sanity check that a comparison is meaningful: `a` and `b` are not equal."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    assert any(
        x.shape != y.shape or not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b)
    ), "the native path did not change anything: this comparison would be vacuous"


# --------------------------------------------------------------------------------------
# The zoo's composite modules.
# --------------------------------------------------------------------------------------


class ScanCell(nn.Module):
    """A recurrent cell with dropout; lifted with `nn.scan` below."""

    features: int
    deterministic: bool

    @nn.compact
    def __call__(self, carry, x):
        h = nn.Dense(self.features)(carry) + nn.Dense(self.features, use_bias=False)(x)
        h = nn.Dropout(0.3, deterministic=self.deterministic)(jnp.tanh(h))
        return h, h


class ScanStack(nn.Module):
    """`nn.scan` over time with separate params per step (variable_axes params: 0)
    and split params and dropout rngs."""

    features: int = 4

    @nn.compact
    def __call__(self, xs, train: bool):  # xs: (time, batch, features)
        cell = nn.scan(
            ScanCell,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=0,
            out_axes=0,
        )
        carry = jnp.zeros((*xs.shape[1:-1], self.features), xs.dtype)
        _, ys = cell(self.features, deterministic=not train)(carry, xs)
        return ys


class RematBlock(nn.Module):
    """Dense + BatchNorm + Dropout, with the mode as a (static) attribute."""

    features: int
    train: bool

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.features, use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=not self.train, momentum=0.9)(y)
        y = nn.Dropout(0.3, deterministic=not self.train)(nn.gelu(y))
        return x + y


class RematNet(nn.Module):
    """Two `nn.remat`-lifted blocks: state updates and rngs through remat."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        for _ in range(2):
            x = nn.remat(RematBlock)(4, train)(x)
        return nn.Dense(2)(x)


class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        y = nn.Conv(self.features, (3, 3), use_bias=False)(nn.relu(y))
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A tiny ResNet: Conv + BatchNorm + relu + residual block + Dropout + Dense.
    Convolutions before a BatchNorm have no bias (its gradient would be pure
    rounding noise, which Adam would amplify into differences of size `lr`)."""

    classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = ResBlock(4)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class SpectralNet(nn.Module):
    """Two spectrally normalised Dense layers; `update_stats` updates `u`/`sigma`."""

    @nn.compact
    def __call__(self, x, update_stats: bool):
        h = nn.SpectralNorm(nn.Dense(8))(x, update_stats=update_stats)
        return nn.SpectralNorm(nn.Dense(1))(nn.relu(h), update_stats=update_stats)


class DecoderWithNorm(nn.Module):
    """Two state collections, created in non-alphabetical order (`cache` before
    `batch_stats`): each must be paired with its own collection."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=True)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)


class Sower(nn.Module):
    """Stores its hidden activation with `sow` (collection `intermediates`)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        self.sow("intermediates", "hidden", h)
        return nn.Dense(2)(nn.relu(h))


class AutoEncoder(nn.Module):
    """Several methods: `encode` updates batch stats, `decode` uses dropout."""

    def setup(self):
        self.enc = nn.Dense(3)
        self.norm = nn.BatchNorm(momentum=0.9)
        self.drop = nn.Dropout(0.5)
        self.dec = nn.Dense(5)

    def encode(self, x, train: bool = False):
        return jnp.tanh(self.norm(self.enc(x), use_running_average=not train))

    def decode(self, z, train: bool = False):
        return self.dec(self.drop(z, deterministic=not train))

    def __call__(self, x, train: bool = False):
        return self.decode(self.encode(x, train), train)


# --------------------------------------------------------------------------------------
# The layer cases: one module, its inputs, and how its mode keyword is mapped.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    # key -> (init args, call args); the call args differ from the init args.
    inputs: Callable[[Any], tuple[tuple, tuple]]
    # to_equinox keywords (train_kwarg= / deterministic_kwarg=)
    wrap: dict = dataclasses.field(default_factory=dict)
    # native keywords in inference mode (also used by native init) and train mode
    infer: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    # whether a training call changes the non-trainable collections
    updates_state: bool = False
    # whether gradients w.r.t. the inputs exist (not for integer inputs)
    diff_inputs: bool = True


def _floats(*shapes):
    def inputs(key):
        k1, k2 = jr.split(key)
        init = tuple(jr.normal(jr.fold_in(k1, i), s) for i, s in enumerate(shapes))
        call = tuple(
            1.5 * jr.normal(jr.fold_in(k2, i), s) + 0.5 for i, s in enumerate(shapes)
        )
        return init, call

    return inputs


def _tokens(key):
    k1, k2 = jr.split(key)
    return (jr.randint(k1, (2, 5), 0, 10),), (jr.randint(k2, (2, 5), 0, 10),)


def _decode_inputs(key):
    """Init with the full length (creates the `cache`), call with one token."""
    k1, k2 = jr.split(key)
    return (jr.normal(k1, (2, 5, 4)),), (jr.normal(k2, (2, 1, 4)),)


def _mode(name, train_value):
    return {name: train_value}, {name: not train_value}


_BN = _mode("use_running_average", False)
_DROP = _mode("deterministic", False)
_SN = _mode("update_stats", True)
_TRAIN = _mode("train", True)

CASES = {
    "dense": Case(lambda: nn.Dense(3), _floats((2, 4))),
    "conv": Case(lambda: nn.Conv(3, (3, 3)), _floats((2, 5, 5, 2))),
    "batchnorm": Case(
        lambda: nn.BatchNorm(momentum=0.9),
        _floats((4, 3)),
        wrap=dict(deterministic_kwarg="use_running_average"),
        train=_BN[0],
        infer=_BN[1],
        updates_state=True,
    ),
    "layernorm": Case(nn.LayerNorm, _floats((2, 5))),
    "groupnorm": Case(lambda: nn.GroupNorm(num_groups=2), _floats((2, 3, 3, 4))),
    "dropout": Case(
        lambda: nn.Dropout(0.5),
        _floats((3, 4)),
        wrap=dict(deterministic_kwarg="deterministic"),
        train=_DROP[0],
        infer=_DROP[1],
    ),
    "embed": Case(lambda: nn.Embed(10, 4), _tokens, diff_inputs=False),
    "attention_decode": Case(
        lambda: nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, decode=True
        ),
        _decode_inputs,
        updates_state=True,
    ),
    "decode_batchnorm": Case(
        DecoderWithNorm,
        _decode_inputs,
        wrap=dict(train_kwarg="train"),
        train=_TRAIN[0],
        infer=_TRAIN[1],
        updates_state=True,
    ),
    "spectral_norm": Case(
        lambda: nn.SpectralNorm(nn.Dense(3)),
        _floats((4, 5)),
        wrap=dict(train_kwarg="update_stats"),
        train=_SN[0],
        infer=_SN[1],
        updates_state=True,
    ),
    "weight_norm": Case(lambda: nn.WeightNorm(nn.Dense(3)), _floats((2, 4))),
    "scan": Case(
        ScanStack,
        _floats((3, 2, 4)),
        wrap=dict(train_kwarg="train"),
        train=_TRAIN[0],
        infer=_TRAIN[1],
    ),
    "remat": Case(
        RematNet,
        _floats((4, 3)),
        wrap=dict(train_kwarg="train"),
        train=_TRAIN[0],
        infer=_TRAIN[1],
        updates_state=True,
    ),
    "resnet": Case(
        ResNet,
        _floats((2, 5, 5, 2)),
        wrap=dict(train_kwarg="train"),
        train=_TRAIN[0],
        infer=_TRAIN[1],
        updates_state=True,
    ),
}
MODE_CASES = [name for name, case in CASES.items() if case.train != case.infer]


@dataclasses.dataclass
class Built:
    module: nn.Module
    model: adapters.ToEquinox
    state: eqx.nn.State
    native: dict  # linen's own init with the same key
    args: tuple  # call args
    key: Any  # the call key


def build(case: Case, key) -> Built:
    init_key, input_key, call_key = jr.split(key, 3)
    init_args, call_args = case.inputs(input_key)
    module = case.make()
    model, state = adapters.to_equinox(module, *init_args, key=init_key, **case.wrap)
    native = module.init(init_rngs(init_key), *init_args, **case.infer)
    return Built(module, model, state, native, call_args, call_key)


def wrapped_loss(diff, state, key, **kwargs):
    """`diff = (model, args)`: the Equinox side of the gradient tests."""
    model, args = diff
    out, state = model(*args, state, key=key, **kwargs)
    return loss_of(out), (out, state)


def native_grads(b: Built, case: Case):
    """`jax.grad` of linen's own apply w.r.t. `params` (and the float inputs)."""

    def loss(params, args):
        out, updates = native_apply(
            b.module, with_params(b.native, params), args, b.key, case.train
        )
        return loss_of(out), (out, updates)

    params = b.native.get("params", {})
    if case.diff_inputs:
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, b.args)
    grads, aux = jax.grad(loss, has_aux=True)(params, b.args)
    return (grads, None), aux


# --------------------------------------------------------------------------------------
# 1-2. Layer by layer: init, forward, gradients, state updates, jit.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_init_matches_native(name, getkey):
    """The wrapper holds exactly what linen's own init creates with the same key:
    `params` as trainable leaves, every other collection in the state."""
    b = build(CASES[name], getkey())
    chex.assert_trees_all_equal(b.model.linen_variables(b.state), b.native)
    assert set(b.model.variables) == set(b.native) & {"params"}
    assert set(b.model.state_indices) == set(non_params(b.native))


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_native(name, getkey):
    """Train-mode call with a key: same output and same state update as linen's
    apply with the same rngs and `mutable=` every non-params collection. The input
    state is left untouched."""
    case = CASES[name]
    b = build(case, getkey())
    old_state = clone(b.state)
    out, new_state = b.model(*b.args, b.state, key=b.key)
    ref_out, ref_updates = native_apply(b.module, b.native, b.args, b.key, case.train)

    chex.assert_trees_all_equal(out, ref_out)
    new_variables = b.model.linen_variables(new_state)
    chex.assert_trees_all_equal(non_params(new_variables), ref_updates)
    chex.assert_trees_all_equal(new_variables.get("params"), b.native.get("params"))
    # Nothing is mutated in place: the old state's arrays still hold the init values.
    chex.assert_trees_all_equal(b.model.linen_variables(old_state), b.native)
    if case.updates_state:
        assert_trees_differ(ref_updates, non_params(b.native))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
@pytest.mark.parametrize("name", CASES)
def test_grads_match_native(name, jit, getkey):
    """`eqx.filter_grad` of the wrapper (grads in `grads.variables["params"]`) equals
    `jax.grad` of linen's apply w.r.t. `variables["params"]`; likewise for the
    inputs, the output and the state update computed under the gradient."""
    case = CASES[name]
    b = build(case, getkey())
    grad_fn = eqx.filter_grad(wrapped_loss, has_aux=True)
    if jit:
        grad_fn = eqx.filter_jit(grad_fn)
    (model_grads, arg_grads), (out, new_state) = grad_fn(
        (b.model, b.args), b.state, b.key
    )
    (ref_param_grads, ref_arg_grads), (ref_out, ref_updates) = native_grads(b, case)

    chex.assert_trees_all_close(
        model_grads.variables.get("params", {}), ref_param_grads, **TOL
    )
    if case.diff_inputs:
        chex.assert_trees_all_close(arg_grads, ref_arg_grads, **TOL)
    chex.assert_trees_all_close(out, ref_out, **TOL)
    chex.assert_trees_all_close(
        non_params(b.model.linen_variables(new_state)), ref_updates, **TOL
    )


@pytest.mark.parametrize("name", CASES)
def test_jax_jit_partition_matches_native(name, getkey):
    """Plain `jax.jit` with Equinox's partition pattern: arrays are traced, the
    linen module and the `inference` flag are static."""
    case = CASES[name]
    b = build(case, getkey())
    arrays, static = eqx.partition(b.model, eqx.is_array)

    @jax.jit
    def call(arrays, state, args, key):
        model = eqx.combine(arrays, static)
        return model(*args, state, key=key)

    out, new_state = call(arrays, b.state, b.args, b.key)
    ref_out, ref_updates = native_apply(b.module, b.native, b.args, b.key, case.train)
    chex.assert_trees_all_close(out, ref_out, **TOL)
    chex.assert_trees_all_close(
        non_params(b.model.linen_variables(new_state)), ref_updates, **TOL
    )


@pytest.mark.parametrize("name", MODE_CASES)
def test_inference_mode_matches_native(name, getkey):
    """`eqx.nn.inference_mode` maps onto the linen keyword (`train=False`,
    `deterministic=True`, `use_running_average=True`, `update_stats=False`): same
    output as linen in that mode, with no key needed and no state change."""
    case = CASES[name]
    b = build(case, getkey())
    model = eqx.nn.inference_mode(b.model)
    assert model.inference and not b.model.inference

    out, new_state = model(*b.args, clone(b.state))
    ref_out, ref_updates = native_apply(b.module, b.native, b.args, None, case.infer)
    chex.assert_trees_all_equal(out, ref_out)
    chex.assert_trees_all_equal(
        non_params(model.linen_variables(new_state)), ref_updates
    )
    # Inference never changes the running statistics or the u/sigma vectors (a
    # decode cache does move on).
    chex.assert_trees_all_equal(
        {c: t for c, t in ref_updates.items() if c != "cache"},
        {c: t for c, t in non_params(b.native).items() if c != "cache"},
    )
    # Sanity: train mode gives another output or state update (SpectralNorm: the
    # same output, but u/sigma updated), so a wrong flag would be caught.
    train_result = native_apply(b.module, b.native, b.args, b.key, case.train)
    assert_trees_differ(train_result, (ref_out, ref_updates))

    # And under filter_jit, flipping back to training mode.
    out, new_state = eqx.filter_jit(eqx.nn.inference_mode(model, False))(
        *b.args, b.state, key=b.key
    )
    ref_out, ref_updates = native_apply(b.module, b.native, b.args, b.key, case.train)
    chex.assert_trees_all_close(out, ref_out, **TOL)
    chex.assert_trees_all_close(
        non_params(model.linen_variables(new_state)), ref_updates, **TOL
    )


def test_explicit_mode_keyword_wins(getkey):
    """A mode keyword given at call time overrides the one derived from
    `inference`, in both directions."""
    case = CASES["batchnorm"]
    b = build(case, getkey())
    # Training model, explicit use_running_average=True -> native inference.
    out, new_state = b.model(*b.args, clone(b.state), use_running_average=True)
    ref_out, ref_updates = native_apply(b.module, b.native, b.args, None, case.infer)
    chex.assert_trees_all_equal(out, ref_out)
    chex.assert_trees_all_equal(
        non_params(b.model.linen_variables(new_state)), ref_updates
    )
    # Inference model, explicit use_running_average=False -> native training.
    model = eqx.nn.inference_mode(b.model)
    out, new_state = model(*b.args, clone(b.state), use_running_average=False)
    ref_out, ref_updates = native_apply(b.module, b.native, b.args, None, case.train)
    chex.assert_trees_all_equal(out, ref_out)
    chex.assert_trees_all_equal(
        non_params(model.linen_variables(new_state)), ref_updates
    )
    assert_trees_differ(ref_updates, non_params(b.native))


def test_dropout_key_gives_native_mask(getkey):
    """The call's key is split by `adapters.linen_rngs` exactly as documented:
    linen's apply with `rngs=linen_rngs(key)` drops the same units; another key
    drops others."""
    module = nn.Dropout(0.5)
    x = jnp.ones((8, 16))
    model, state = adapters.to_equinox(
        module, x, key=getkey(), deterministic_kwarg="deterministic"
    )
    key, other = getkey(), getkey()
    out, _ = model(x, state, key=key)
    ref = module.apply({}, x, deterministic=False, rngs=adapters.linen_rngs(key))
    chex.assert_trees_all_equal(out, ref)
    other_out, _ = model(x, state, key=other)
    assert_trees_differ(other_out, out)


def test_vmap_axis_name_matches_batched_native(getkey):
    """Per-example `jax.vmap(model, axis_name=..., in_axes=(0, None),
    out_axes=(0, None))`, as for `eqx.nn.BatchNorm`: linen's
    `BatchNorm(axis_name="batch")` averages over the vmapped axis, so output and
    batch-stats update equal linen's own batched BatchNorm."""
    init_key, x_key = getkey(), getkey()
    x = 2.0 * jr.normal(x_key, (6, 3)) + 1.0
    model, state = adapters.to_equinox(
        nn.BatchNorm(momentum=0.9, axis_name="batch"),
        x[0],
        key=init_key,
        deterministic_kwarg="use_running_average",
    )
    module = nn.BatchNorm(momentum=0.9)
    native = module.init(init_rngs(init_key), x, use_running_average=True)
    chex.assert_trees_all_equal(model.linen_variables(state), native)

    @eqx.filter_jit
    def per_example(model, x, state):
        batched = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )
        return batched(x, state)

    out, new_state = per_example(model, x, state)
    ref_out, updates = module.apply(
        native, x, use_running_average=False, mutable=["batch_stats"]
    )
    chex.assert_trees_all_close(out, ref_out, **TOL)
    chex.assert_trees_all_close(
        non_params(model.linen_variables(new_state)), updates, **TOL
    )
    assert_trees_differ(updates, non_params(native))


# --------------------------------------------------------------------------------------
# Attention with a decode cache: step by step, and inside `jax.lax.scan`.
# --------------------------------------------------------------------------------------


def _attention(key):
    module = CASES["attention_decode"].make()
    init_key, x_key = jr.split(key)
    x = jr.normal(x_key, (2, 5, 4))
    model, state = adapters.to_equinox(module, x, key=init_key)
    native = module.init(init_rngs(init_key), x)
    chex.assert_trees_all_equal(model.linen_variables(state), native)
    return module, model, state, native, x


def test_attention_decode_loop_matches_native(getkey):
    """Several single-token decode steps: after every step the output and the whole
    `cache` (keys, values, index) equal linen's own loop."""
    module, model, state, native, x = _attention(getkey())
    cache = native["cache"]
    for i in range(x.shape[1]):
        token = x[:, i : i + 1]
        out, state = model(token, state)
        ref_out, updates = module.apply(
            {"params": native["params"], "cache": cache}, token, mutable=["cache"]
        )
        assert_trees_differ(updates["cache"], cache)  # the cache really moves on
        cache = updates["cache"]
        chex.assert_trees_all_equal(out, ref_out)
        chex.assert_trees_all_equal(model.linen_variables(state)["cache"], cache)
    assert int(cache["cache_index"]) == x.shape[1]


def test_attention_decode_scan_matches_native_loop(getkey):
    """The decode loop as `jax.lax.scan` carrying the `eqx.nn.State` equals linen's
    apply in a Python loop."""
    module, model, state, native, x = _attention(getkey())

    def body(state, token):
        out, state = model(token, state)
        return state, out

    tokens = jnp.swapaxes(x, 0, 1)[:, :, None, :]  # (time, batch, 1, features)
    final_state, outs = jax.lax.scan(body, state, tokens)

    cache, ref_outs = native["cache"], []
    for token in tokens:
        ref_out, updates = module.apply(
            {"params": native["params"], "cache": cache}, token, mutable=["cache"]
        )
        cache = updates["cache"]
        ref_outs.append(ref_out)
    chex.assert_trees_all_close(outs, jnp.stack(ref_outs), **TOL)
    chex.assert_trees_all_close(
        model.linen_variables(final_state)["cache"], cache, **TOL
    )


def test_attention_decode_step_does_not_retrace(getkey):
    """A jitted decode step, called with the state it returned, compiles once."""
    module, model, state, native, x = _attention(getkey())

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, state, token):
        return model(token, state)

    cache = native["cache"]
    for i in range(x.shape[1]):
        token = x[:, i : i + 1]
        out, state = step(model, state, token)
        ref_out, updates = module.apply(
            {"params": native["params"], "cache": cache}, token, mutable=["cache"]
        )
        cache = updates["cache"]
        chex.assert_trees_all_close(out, ref_out, **TOL)
        chex.assert_trees_all_close(model.linen_variables(state)["cache"], cache, **TOL)


# --------------------------------------------------------------------------------------
# sow / capture, several methods, ToEquinox inside a larger Equinox model.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_sow_capture_matches_native(jit, getkey):
    """`capture=("intermediates",)` returns what linen's `mutable=["intermediates"]`
    returns; values sowed on one call are not carried into the next (still exactly
    one sowed value), and none are stored in the state."""
    module = Sower()
    init_key, x_key = getkey(), getkey()
    x = jr.normal(x_key, (3, 5))
    model, state = adapters.to_equinox(module, x, key=init_key)
    native = module.init(init_rngs(init_key), x)
    chex.assert_trees_all_equal(model.linen_variables(state), native)
    assert "intermediates" not in native and not model.state_indices

    call = eqx.filter_jit(model) if jit else model
    for i in range(2):
        xi = x + i
        (out, captured), state = call(xi, state, capture=("intermediates",))
        ref_out, ref_captured = module.apply(native, xi, mutable=["intermediates"])
        assert len(captured["intermediates"]["hidden"]) == 1
        chex.assert_trees_all_close((out, captured), (ref_out, ref_captured), **TOL)
        if not jit:
            chex.assert_trees_all_equal((out, captured), (ref_out, ref_captured))

    # Gradients can flow through the captured values too.
    def loss(model):
        (out, captured), _ = model(x, state, capture="intermediates")
        return loss_of(out) + loss_of(captured)

    def ref_loss(params):
        out, captured = module.apply({"params": params}, x, mutable=["intermediates"])
        return loss_of(out) + loss_of(captured)

    grads = eqx.filter_grad(loss)(model)
    ref_grads = jax.grad(ref_loss)(native["params"])
    chex.assert_trees_all_close(grads.variables["params"], ref_grads, **TOL)


@pytest.mark.parametrize("as_function", [False, True], ids=["name", "function"])
@pytest.mark.parametrize("method", ["encode", "decode"])
def test_methods_match_native(method, as_function, getkey):
    """`model(..., method=...)` calls the same linen method as `apply(method=...)`:
    output, gradients, batch stats (updated by `encode` only) and dropout keys."""
    module = AutoEncoder()
    init_key, x_key, key = getkey(), getkey(), getkey()
    x = jr.normal(x_key, (4, 5))
    model, state = adapters.to_equinox(module, x, key=init_key, train_kwarg="train")
    native = module.init(init_rngs(init_key), x, train=False)
    chex.assert_trees_all_equal(model.linen_variables(state), native)
    inputs = x if method == "encode" else jr.normal(x_key, (4, 3))
    chosen = getattr(AutoEncoder, method) if as_function else method

    def loss(model):
        out, new_state = model(inputs, clone(state), key=key, method=chosen)
        return loss_of(out), (out, new_state)

    def ref_loss(params):
        out, updates = native_apply(
            module,
            {**native, "params": params},
            (inputs,),
            key,
            {"train": True},
            chosen,
        )
        return loss_of(out), (out, updates)

    grads, (out, new_state) = eqx.filter_grad(loss, has_aux=True)(model)
    ref_grads, (ref_out, ref_updates) = jax.grad(ref_loss, has_aux=True)(
        native["params"]
    )
    chex.assert_trees_all_close(out, ref_out, **TOL)
    chex.assert_trees_all_close(grads.variables["params"], ref_grads, **TOL)
    chex.assert_trees_all_equal(
        non_params(model.linen_variables(new_state)), ref_updates
    )
    if method == "encode":
        assert_trees_differ(ref_updates, non_params(native))
    # Only the chosen method ran: the other half of the model gets no gradient.
    other = "dec" if method == "encode" else "enc"
    assert not np.any(np.asarray(ref_grads[other]["kernel"]))
    # Sanity: a different dropout key changes `decode` (so the key is used).
    if method == "decode":
        other_out, _ = model(inputs, clone(state), key=getkey(), method=chosen)
        assert_trees_differ(other_out, out)


def test_to_equinox_inside_equinox_model(getkey):
    """A `ToEquinox` built in the `__init__` of a larger Equinox model: the outer
    `eqx.nn.make_with_state` collects its state next to an `eqx.nn.BatchNorm`."""
    bn_key, lin_key, x_key = getkey(), getkey(), getkey()
    example = jnp.zeros((4, 3))

    class Net(eqx.Module):
        body: adapters.ToEquinox
        head: eqx.nn.Linear
        norm: eqx.nn.BatchNorm

        def __init__(self):
            self.body = adapters.ToEquinox(
                nn.BatchNorm(momentum=0.9),
                example,
                key=bn_key,
                deterministic_kwarg="use_running_average",
            )
            self.head = eqx.nn.Linear(3, 2, key=lin_key)
            self.norm = eqx.nn.BatchNorm(2, axis_name="batch", mode="batch")

        def __call__(self, x, state):
            h, state = self.body(x, state)
            h = jax.vmap(self.head)(h)
            h, state = jax.vmap(
                self.norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )(h, state)
            return h, state

    model, state = eqx.nn.make_with_state(Net)()
    module = nn.BatchNorm(momentum=0.9)
    native = module.init(init_rngs(bn_key), example, use_running_average=True)
    chex.assert_trees_all_equal(model.body.linen_variables(state), native)

    x = 2.0 * jr.normal(x_key, (4, 3)) + 1.0
    out, new_state = model(x, clone(state))
    h, updates = module.apply(
        native, x, use_running_average=False, mutable=["batch_stats"]
    )
    chex.assert_trees_all_equal(
        model.body.linen_variables(new_state), {**native, **updates}
    )
    ref_out, _ = jax.vmap(
        model.norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(jax.vmap(model.head)(h), state)
    chex.assert_trees_all_close(out, ref_out, **TOL)
    assert_trees_differ(updates, non_params(native))


# --------------------------------------------------------------------------------------
# 3-4. Optimiser trajectories, and no retracing of the jitted step.
# --------------------------------------------------------------------------------------


# optax.adam's bias correction computes `decay ** count` (a Python float to the power
# of an int32 array), which jax_numpy_dtype_promotion="strict" (tests/conftest.py)
# rejects. This is optax's code, not the adapter's or linen's: only the optimiser
# update, on both sides alike, runs under standard promotion.
def optax_promotion():
    return jax.numpy_dtype_promotion("standard")


def _trajectory(module, x0, batches, loss_fn, mode_kwarg, key, lr=1e-2):
    """Runs 5 optax.adam steps both ways and compares after every step.

    `batches(i) -> (x, y)`; `loss_fn(out, y) -> scalar`. Per-step keys are
    `fold_in(key, i)`, given to the wrapper as `key=` and to linen as
    `rngs=adapters.linen_rngs(...)`.
    """
    init_key, step_key = jr.split(key)
    model, state = adapters.to_equinox(module, x0, key=init_key, train_kwarg=mode_kwarg)
    variables = module.init(init_rngs(init_key), x0, **{mode_kwarg: False})
    chex.assert_trees_all_equal(model.linen_variables(state), variables)
    params, stats = variables["params"], variables["batch_stats"]
    initial_stats = stats

    opt = optax.adam(lr)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    ref_opt_state = opt.init(params)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, state, opt_state, x, y, key):
        def loss(model, state):
            out, state = model(x, state, key=key)
            return loss_fn(out, y), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            model, state
        )
        with optax_promotion():
            updates, opt_state = opt.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
            )
        return eqx.apply_updates(model, updates), state, opt_state, value

    @jax.jit
    def ref_step(params, stats, opt_state, x, y, key):
        def loss(params):
            out, updates = module.apply(
                {"params": params, "batch_stats": stats},
                x,
                rngs=adapters.linen_rngs(key, STREAMS),
                mutable=["batch_stats"],
                **{mode_kwarg: True},
            )
            return loss_fn(out, y), updates["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        with optax_promotion():
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value

    initial_params = params
    for i in range(5):
        x, y = batches(i)
        k = jr.fold_in(step_key, i)
        model, state, opt_state, value = step(model, state, opt_state, x, y, k)
        params, stats, ref_opt_state, ref_value = ref_step(
            params, stats, ref_opt_state, x, y, k
        )
        chex.assert_trees_all_close(value, ref_value, **TOL)
        got = model.linen_variables(state)
        chex.assert_trees_all_close(got["params"], params, **TOL)
        chex.assert_trees_all_close(got["batch_stats"], stats, **TOL)
    assert_trees_differ(params, initial_params)
    assert_trees_differ(stats, initial_stats)


def test_resnet_adam_trajectory(getkey):
    """ResNet with BatchNorm + Dropout, 5 Adam steps: params, batch stats and losses
    agree with a native linen/optax loop after every step; the step compiles once."""
    data_key = getkey()

    def batches(i):
        kx, ky = jr.split(jr.fold_in(data_key, i))
        return jr.normal(kx, (4, 6, 6, 2)), jr.randint(ky, (4,), 0, 3)

    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    _trajectory(ResNet(), batches(0)[0], batches, cross_entropy, "train", getkey())


def test_spectral_norm_adam_trajectory(getkey):
    """SpectralNorm model (`update_stats` mapped by `train_kwarg`), 5 Adam steps:
    params, `u`/`sigma` and losses agree after every step."""
    data_key = getkey()

    def batches(i):
        kx, ky = jr.split(jr.fold_in(data_key, i))
        return jr.normal(kx, (8, 3)), jr.normal(ky, (8, 1))

    def mse(out, target):
        return jnp.mean((out - target) ** 2)

    _trajectory(SpectralNet(), batches(0)[0], batches, mse, "update_stats", getkey())
