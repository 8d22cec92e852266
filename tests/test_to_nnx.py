"""`adapters.to_nnx` / `adapters.EquinoxToNNX`: an Equinox model as a Flax NNX module,
every behaviour against native Equinox.

The native side calls the Equinox model directly: per example, mapped over the batch
with `jax.vmap(..., axis_name="batch", in_axes=(0, None), out_axes=(0, None))` (the
state unmapped), trained with optax under `eqx.filter_jit`. The wrapped side runs
under NNX (`nnx.jit`, `nnx.grad`, `nnx.Optimizer`, `nnx.vmap`, `nnx.scan`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from flax import nnx

import adapters


RTOL, ATOL = 1e-5, 1e-6
DROPOUT_SEED = 7
BATCH = {"vmap_axis": 0, "axis_name": "batch"}


# ---------------------------------------------------------------------------
# Models: tiny, per example (an `eqx.nn.Linear` takes a vector).


class BNNet(eqx.Module):
    """Linear -> BatchNorm(axis_name="batch") -> relu -> Linear."""

    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    l2: eqx.nn.Linear

    def __init__(self, key, mode="batch", size=3):
        k1, k2 = jr.split(key)
        self.l1 = eqx.nn.Linear(size, 4, key=k1)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode=mode, momentum=0.9)
        self.l2 = eqx.nn.Linear(4, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        x, state = self.bn(self.l1(x), state)
        return self.l2(jax.nn.relu(x)), state


class DropNet(eqx.Module):
    """Linear -> Dropout -> Linear: needs a key unless in inference mode."""

    l1: eqx.nn.Linear
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.l1 = eqx.nn.Linear(3, 4, key=k1)
        self.drop = eqx.nn.Dropout(0.5)
        self.l2 = eqx.nn.Linear(4, 2, key=k2)

    def __call__(self, x, *, key=None):
        return self.l2(self.drop(jnp.tanh(self.l1(x)), key=key))


class BufferNet(eqx.Module):
    """A model holding an integer buffer that its computation uses."""

    linear: eqx.nn.Linear
    perm: jax.Array

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.perm = jnp.arange(4, dtype=jnp.int32)

    def __call__(self, x):
        y = self.linear(x)
        return y[self.perm[::-1]] * (self.perm + 1)


class NumpyNet(eqx.Module):
    """Holds NumPy arrays, as Equinox models may: a float64 scale and an int64
    permutation (NumPy's defaults), which JAX's 32-bit mode runs as float32/int32."""

    linear: eqx.nn.Linear
    scale: np.ndarray
    perm: np.ndarray

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.scale = np.linspace(0.5, 1.5, 4)
        self.perm = np.arange(4)

    def __call__(self, x):
        return self.linear(x)[self.perm[::-1]] * self.scale


class Counter(eqx.Module):
    """Counts its calls in its state, in inference mode too (as a decode step
    counter does)."""

    index: eqx.nn.StateIndex
    inference: bool

    def __init__(self):
        self.index = eqx.nn.StateIndex(jnp.array(0, jnp.int32))
        self.inference = False

    def __call__(self, x, state):
        count = state.get(self.index)
        return x * (count + 1), state.set(self.index, count + 1)


class CountNet(eqx.Module):
    linear: eqx.nn.Linear
    counter: Counter

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.counter = Counter()

    def __call__(self, x, state):
        return self.counter(self.linear(x), state)


class RewriteNet(eqx.Module):
    """With `rewrite=...`, returns a state rebuilt by hand (`State.set` would refuse
    it) whose entries no longer fit: `"shape"`, `index` with another shape;
    `"structure"`, `index` now two (new) arrays; `"pair"`, `other` now twice its
    unchanged array, `index` unchanged too; `"missing"`, without `other`, `index`
    unchanged; `"missing_updated"`, without `other`, `index` updated."""

    linear: eqx.nn.Linear
    index: eqx.nn.StateIndex
    other: eqx.nn.StateIndex

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.index = eqx.nn.StateIndex(jnp.zeros(2))
        self.other = eqx.nn.StateIndex(jnp.zeros(2))

    def __call__(self, x, state, *, rewrite=None):
        index, other = state.get(self.index), state.get(self.other)
        y = self.linear(x) + index - other
        if rewrite is None:
            state = state.set(self.index, index + 1.0)
            return y, state.set(self.other, other + 2.0)
        entries = {
            "shape": {"index": jnp.concatenate([index, index]), "other": other},
            "structure": {"index": (index + 1.0, index + 2.0), "other": other},
            "pair": {"index": index, "other": (other, other)},
            "missing": {"index": index},
            "missing_updated": {"index": index + 1.0},
        }[rewrite]
        indices = {"index": self.index, "other": self.other}
        markers = tuple(indices[k].marker for k in entries)
        return y, eqx.nn.State.tree_unflatten(markers, tuple(entries.values()))


class PerExampleState(eqx.Module):
    """Writes a per-example value into its state, without an axis name."""

    linear: eqx.nn.Linear
    index: eqx.nn.StateIndex

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.index = eqx.nn.StateIndex(jnp.zeros(()))

    def __call__(self, x, state, *, update=True):
        y = self.linear(x)
        return y, state.set(self.index, jnp.mean(y)) if update else state


class Block(eqx.Module):
    linear: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(4, 4, key=key)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")

    def __call__(self, x, state):
        x, state = self.bn(self.linear(x), state)
        return jnp.tanh(x), state


def _mlp(key):
    return eqx.nn.MLP(3, 2, 4, 1, key=key)


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[Any], tuple[Any, Any]]  # key -> (model, state or None)
    options: dict
    dropout: bool = False


CASES = {
    "batch_norm": Case(lambda k: eqx.nn.make_with_state(BNNet)(k, "batch"), BATCH),
    "batch_norm_ema": Case(lambda k: eqx.nn.make_with_state(BNNet)(k, "ema"), BATCH),
    "dropout": Case(lambda k: (DropNet(k), None), {"vmap_axis": 0}, dropout=True),
    "int_buffers": Case(lambda k: (BufferNet(k), None), {"vmap_axis": 0}),
    "stateless_mlp": Case(lambda k: (_mlp(k), None), {"vmap_axis": 0}),
    # Built without make_with_state: the wrapper makes the state itself.
    "without_make_with_state": Case(lambda k: (BNNet(k, "batch"), None), BATCH),
}
STATEFUL = ["batch_norm", "batch_norm_ema", "without_make_with_state"]


# ---------------------------------------------------------------------------
# Native Equinox computations, and comparisons by path.


def _is_index(x):
    return isinstance(x, eqx.nn.StateIndex)


def _native_state(model, state):
    """The state that native code calls the model with: the given one, or the one
    `eqx.nn.State` makes of a model built without `make_with_state`."""
    if state is None and any(map(_is_index, jtu.tree_leaves(model, is_leaf=_is_index))):
        return eqx.nn.State(model)
    return state


def native_apply(model, state, x, key=None, **kwargs):
    """The per-example Equinox model over a batch: `jax.vmap` with the state unmapped
    and, with a key, one key per example (`jax.random.split(key, batch)`)."""

    def one(x, state, key):
        kw = kwargs if key is None else {**kwargs, "key": key}
        if state is None:
            return model(x, **kw), None
        return model(x, state, **kw)

    keys = None if key is None else jr.split(key, x.shape[0])
    return jax.vmap(
        one,
        axis_name="batch",
        in_axes=(0, None, None if keys is None else 0),
        out_axes=(0, None),
    )(x, state, keys)


def _keys(path):
    return tuple(
        str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path
    )


def native_params(model):
    """The model's trainable arrays by Equinox path (not a `StateIndex`'s init)."""
    flat, _ = jtu.tree_flatten_with_path(model, is_leaf=_is_index)
    return {_keys(p): x for p, x in flat if eqx.is_inexact_array(x)}


def native_stats(model, state):
    """Every state entry's arrays by the path of its `StateIndex` (then the index
    inside the entry, e.g. the mean and variance of a BatchNorm). Also for an
    ensemble: stacked models and states."""
    out = {}
    if state is None:
        return out
    for path, index in jtu.tree_flatten_with_path(model, is_leaf=_is_index)[0]:
        if _is_index(index):
            for q, x in jtu.tree_flatten_with_path(state.get(index))[0]:
                out[_keys(path) + _keys(q)] = x
    return out


def nnx_flat(tree, collection=None):
    """An NNX state (or the module's) by path, the collection name dropped."""
    out = {}
    for path, v in nnx.to_flat_state(tree):
        if collection is not None:
            assert path[0] == collection, path
            path = path[1:]
        out[tuple(map(str, path))] = v.get_value() if isinstance(v, nnx.Variable) else v
    return out


def module_params(module):
    return nnx_flat(nnx.state(module, nnx.Param), "params")


def module_stats(module):
    return nnx_flat(nnx.state(module, nnx.BatchStat), "batch_stats")


def assert_close(got, want, exact=False):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a, b)
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=str(k))
        else:
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=str(k))


def _wrap(case, model, state):
    rngs = nnx.Rngs(dropout=DROPOUT_SEED) if case.dropout else None
    return adapters.to_nnx(model, state, rngs=rngs, **case.options)


def _native_keys(case):
    """The keys a wrapped `case` draws, call by call: its stream is
    `rngs["dropout"].fork()`, made at construction, drawn once per call."""
    if not case.dropout:
        return lambda: None
    return nnx.Rngs(dropout=DROPOUT_SEED)["dropout"].fork()


def _data(key, size=3, batch=5):
    kx, ky = jr.split(key)
    return jr.normal(kx, (batch, size)), ky


def _out_size(name):
    return 4 if name == "int_buffers" else 2


OPTIM = optax.adam(1e-2)


@nnx.jit
def nnx_step(module, optimizer, x, y):
    def loss_fn(module):
        return jnp.mean((module(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(module)
    optimizer.update(module, grads)
    return loss


def _native_loss(model, state, x, y, key):
    out, state = native_apply(model, state, x, key)
    return jnp.mean((out - y) ** 2), state


@eqx.filter_jit
def native_step(model, state, opt_state, x, y, key):
    (loss, state), grads = eqx.filter_value_and_grad(_native_loss, has_aux=True)(
        model, state, x, y, key
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = OPTIM.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), state, opt_state, loss


# ---------------------------------------------------------------------------
# 1-2. Outputs, state, gradients and training, against native Equinox.


@pytest.mark.parametrize("name", CASES)
def test_calls_match_native(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    module = _wrap(case, model, state)
    native, native_keys = _native_state(model, state), _native_keys(case)
    x, _ = _data(getkey())
    for _ in range(2):
        out = module(x)
        want, native = native_apply(model, native, x, native_keys())
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
        # The state update is written into the module's variables, in place.
        assert_close(module_stats(module), native_stats(model, native))
    assert_close(module_params(module), native_params(model), exact=True)


@pytest.mark.parametrize("name", CASES)
def test_grads_match_native(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    module = _wrap(case, model, state)
    native, native_keys = _native_state(model, state), _native_keys(case)
    x, ky = _data(getkey())
    y = jr.normal(ky, (5, _out_size(name)))

    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(module)
    (_, new_native), native_grads = eqx.filter_value_and_grad(
        _native_loss, has_aux=True
    )(model, native, x, y, native_keys())

    assert_close(nnx_flat(grads, "params"), native_params(native_grads))
    assert_close(module_stats(module), native_stats(model, new_native))
    if name == "int_buffers":  # an int32 buffer is a constant, not a Param
        assert ("perm",) not in module_params(module)
        assert module.constants["perm"].get_value() is model.perm


@pytest.mark.parametrize("name", CASES)
def test_optimizer_matches_optax(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    module = _wrap(case, model, state)
    optimizer = nnx.Optimizer(module, OPTIM, wrt=nnx.Param)
    native, native_keys = _native_state(model, state), _native_keys(case)
    native_model = model
    opt_state = OPTIM.init(eqx.filter(model, eqx.is_inexact_array))
    x, ky = _data(getkey())
    y = jr.normal(ky, (5, _out_size(name)))
    for _ in range(3):
        loss = nnx_step(module, optimizer, x, y)
        native_model, native, opt_state, native_loss = native_step(
            native_model, native, opt_state, x, y, native_keys()
        )
        np.testing.assert_allclose(loss, native_loss, rtol=RTOL, atol=ATOL)
        assert_close(module_params(module), native_params(native_model))
        assert_close(module_stats(module), native_stats(model, native))
    # And back: the Equinox model and state the module holds are the trained ones.
    trained, trained_state = module.equinox_model()
    assert_close(native_params(trained), native_params(native_model))
    assert_close(
        native_stats(trained, trained_state), native_stats(native_model, native)
    )
    if name == "int_buffers":  # never trained (nnx.jit gives back new arrays)
        np.testing.assert_array_equal(module.constants["perm"][...], model.perm)
        assert trained.perm.dtype == jnp.int32
        np.testing.assert_array_equal(trained.perm, model.perm)


# ---------------------------------------------------------------------------
# 3. eval() / train().


@pytest.mark.parametrize("name", CASES)
def test_eval_is_inference_mode(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    module = _wrap(case, model, state)
    native, native_keys = _native_state(model, state), _native_keys(case)
    x, _ = _data(getkey())
    module(x)  # one training call, so that the statistics are not the initial ones
    _, native = native_apply(model, native, x, native_keys())

    before = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(module))}
    module.eval()
    out = module(x)
    # In eval mode no key is drawn, as NNX layers draw none when deterministic: the
    # stream does not advance, and the next training call gets the next key.
    want, native_after = native_apply(eqx.nn.inference_mode(model), native, x, None)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    assert_close(
        native_stats(model, native_after), native_stats(model, native), exact=True
    )
    after = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(module))}
    for k, v in before.items():  # everything untouched, the RNG count included
        assert after[k] is v, k

    module.train()
    out = module(x)
    want, native = native_apply(model, native, x, native_keys())
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(module), native_stats(model, native))
    if name in STATEFUL:
        assert not np.array_equal(
            module.batch_stats["bn"][_stat_name(name)][0].get_value(),
            before[("batch_stats", "bn", _stat_name(name), 0)],
        )


def _stat_name(name):
    return "ema_state_index" if name == "batch_norm_ema" else "batch_state_index"


def test_numpy_arrays_under_nnx_jit(getkey):
    """NumPy arrays in the model: natively, `eqx.filter_jit` and optax run them (as
    float32/int32); wrapped, `nnx.jit` and `nnx.Optimizer` must too."""
    model = NumpyNet(getkey())
    module = adapters.to_nnx(model, vmap_axis=0)
    x, ky = _data(getkey())
    y = jr.normal(ky, (5, 4))
    want, _ = native_apply(model, None, x)
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    optimizer = nnx.Optimizer(module, OPTIM, wrt=nnx.Param)
    native_model = model
    opt_state = OPTIM.init(eqx.filter(model, eqx.is_inexact_array))
    for _ in range(2):
        loss = nnx_step(module, optimizer, x, y)
        native_model, _, opt_state, want = native_step(
            native_model, None, opt_state, x, y, None
        )
        np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
        assert_close(module_params(module), native_params(native_model))
    np.testing.assert_array_equal(module.constants["perm"][...], model.perm)


def test_dropout_key_argument_used_directly(getkey):
    model = DropNet(getkey())
    module = adapters.to_nnx(model, rngs=nnx.Rngs(dropout=0), vmap_axis=0)
    x, _ = _data(getkey())
    key = getkey()
    want, _ = native_apply(model, None, x, key)
    np.testing.assert_allclose(module(x, key=key), want, rtol=RTOL, atol=ATOL)
    # The stream was not drawn: the next call gets the stream's first key.
    first = nnx.Rngs(dropout=0)["dropout"].fork()()
    want, _ = native_apply(model, None, x, first)
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    # Without vmap_axis, the key reaches the model as it is.
    drop = eqx.nn.Dropout(0.5)
    np.testing.assert_array_equal(adapters.to_nnx(drop)(x, key=key), drop(x, key=key))


# ---------------------------------------------------------------------------
# 4. Round trips and NNX's graph API.


@pytest.mark.parametrize("name", CASES)
def test_equinox_model_is_the_given_arrays(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    module = _wrap(case, model, state)
    got, got_state = module.equinox_model()
    want = eqx.nn.delete_init_state(model)
    assert jtu.tree_structure(got) == jtu.tree_structure(want)
    for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True):
        assert a is b
    if state is not None:
        for path, index in jtu.tree_flatten_with_path(got, is_leaf=_is_index)[0]:
            if _is_index(index):
                for a, b in zip(
                    jtu.tree_leaves(got_state.get(index)),
                    jtu.tree_leaves(state.get(index)),
                    strict=True,
                ):
                    assert a is b, path
    elif name in STATEFUL:  # the state made with eqx.nn.State(model)
        assert_close(
            native_stats(got, got_state),
            native_stats(model, eqx.nn.State(model)),
            exact=True,
        )
    else:
        assert got_state is None
    # And the returned pair computes what the given one does.
    x, _ = _data(getkey())
    key = None if not case.dropout else getkey()
    out, new = native_apply(got, got_state, x, key)
    want_out, want_new = native_apply(model, _native_state(model, state), x, key)
    np.testing.assert_array_equal(out, want_out)
    assert_close(native_stats(got, new), native_stats(model, want_new), exact=True)


@pytest.mark.parametrize("name", ["batch_norm", "dropout", "stateless_mlp"])
def test_split_merge(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    module = _wrap(case, model, state)
    x, _ = _data(getkey())
    module(x)
    native, native_keys = _native_state(model, state), _native_keys(case)
    _, native = native_apply(model, native, x, native_keys())

    clone = nnx.clone(module)  # a copy, on variables of its own
    clone_native, clone_keys = native, _native_keys(case)
    clone_keys()  # the clone's stream has drawn once, as the module's has
    graphdef, variables = nnx.split(module)
    merged = nnx.merge(graphdef, variables)
    want, native = native_apply(model, native, x, native_keys())
    np.testing.assert_allclose(merged(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(merged), native_stats(model, native))
    # As for NNX's own layers, the merged module shares the module's variables.
    assert_close(module_stats(module), native_stats(model, native), exact=True)

    # Pure functional use: nnx.split/merge inside jax.jit, then nnx.update.
    @jax.jit
    def pure(variables, x):
        m = nnx.merge(graphdef, variables)
        y = m(x)
        return y, nnx.state(m)

    graphdef, variables = nnx.split(module)
    before = _snapshot(module)
    y, new_variables = pure(variables, x)
    want, native = native_apply(model, native, x, native_keys())
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
    assert_close(
        nnx_flat(nnx.filter_state(new_variables, nnx.BatchStat), "batch_stats"),
        native_stats(model, native),
    )
    _assert_unchanged(module, before)
    nnx.update(module, new_variables)
    assert_close(module_stats(module), native_stats(model, native))
    want, next_native = native_apply(model, native, x, native_keys())
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(module), native_stats(model, next_native))

    # The clone made before all this computes what the module did then.
    want, native = native_apply(model, clone_native, x, clone_keys())
    np.testing.assert_allclose(clone(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(clone), native_stats(model, native))


@pytest.mark.parametrize("name", ["batch_norm", "dropout"])
def test_state_update_copies_between_modules(name, getkey):
    case = CASES[name]
    model_a, state_a = case.build(getkey())
    model_b, state_b = case.build(getkey())
    a, b = _wrap(case, model_a, state_a), _wrap(case, model_b, state_b)
    x, _ = _data(getkey())
    a(x)
    native_keys = _native_keys(case)
    _, native = native_apply(model_a, state_a, x, native_keys())

    nnx.update(b, nnx.state(a))
    assert_close(module_stats(b), native_stats(model_a, native), exact=True)
    want, native = native_apply(model_a, native, x, native_keys())
    np.testing.assert_allclose(b(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(b), native_stats(model_a, native))
    got, _ = b.equinox_model()
    assert_close(native_params(got), native_params(model_a), exact=True)
    assert_close(module_params(b), native_params(model_a), exact=True)


def test_display_and_paths(getkey, capsys):
    model, state = eqx.nn.make_with_state(BNNet)(getkey())
    module = adapters.to_nnx(model, state, **BATCH)
    text = repr(module)
    assert "params" in text and "batch_stats" in text
    nnx.display(module)
    printed = capsys.readouterr().out
    assert "params" in printed and "batch_stats" in printed

    paths = {p for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert paths == {("params",) + k for k in native_params(model)}
    assert ("params", "l1", "weight") in paths
    stats = {p for p, _ in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))}
    assert {tuple(map(str, p)) for p in stats} == {
        ("batch_stats",) + k for k in native_stats(model, state)
    }

    mlp = _mlp(getkey())
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(adapters.to_nnx(mlp)))}
    assert ("params", "layers", "0", "weight") in paths
    assert paths == {("params",) + k for k in native_params(mlp)}


# ---------------------------------------------------------------------------
# 5. Ensembles: nnx.vmap, eqx.filter_vmap, nnx.scan.


def _native_ensemble(keys, mode="batch", size=3):
    return eqx.filter_vmap(lambda k: eqx.nn.make_with_state(BNNet)(k, mode, size))(keys)


def test_nnx_vmap_ensemble(getkey):
    keys = jr.split(getkey(), 3)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        model, state = eqx.nn.make_with_state(BNNet)(key, "ema")
        return adapters.to_nnx(model, state, **BATCH)

    @nnx.jit
    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def forward(module, x):
        return module(x)

    ensemble = create(keys)
    models, states = _native_ensemble(keys, "ema")
    assert_close(module_params(ensemble), native_params(models), exact=True)

    native_forward = eqx.filter_jit(
        eqx.filter_vmap(
            lambda m, s, x: native_apply(m, s, x), in_axes=(eqx.if_array(0), 0, None)
        )
    )
    x, _ = _data(getkey())
    for _ in range(2):
        out = forward(ensemble, x)
        want, states = native_forward(models, states, x)
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
        assert_close(module_stats(ensemble), native_stats(models, states))
    ensemble.eval()
    want, _ = native_forward(eqx.nn.inference_mode(models), states, x)
    np.testing.assert_allclose(forward(ensemble, x), want, rtol=RTOL, atol=ATOL)


def test_filter_vmap_of_composition(getkey):
    """`eqx.filter_vmap` over `to_equinox(to_nnx(model, state))`, built per key."""
    keys = jr.split(getkey(), 3)

    @eqx.filter_vmap
    def make(key):
        model, state = eqx.nn.make_with_state(BNNet)(key, "ema")
        return adapters.to_equinox(adapters.to_nnx(model, state, **BATCH))

    composed, cstates = make(keys)
    models, states = _native_ensemble(keys, "ema")

    def call(m, s, x):
        return m(x, s)

    forward = eqx.filter_vmap(call, in_axes=(eqx.if_array(0), 0, None))
    native_forward = eqx.filter_vmap(
        lambda m, s, x: native_apply(m, s, x), in_axes=(eqx.if_array(0), 0, None)
    )
    x, _ = _data(getkey())
    for _ in range(2):
        out, cstates = forward(composed, cstates, x)
        want, states = native_forward(models, states, x)
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    held = cstates.get(composed.state_index)["batch_stats"]
    got = {k: v for k, v in nnx_flat(nnx.State(held)).items()}
    assert_close(got, native_stats(models, states))
    out, _ = forward(eqx.nn.inference_mode(composed), cstates, x)
    want, _ = native_forward(eqx.nn.inference_mode(models), states, x)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_nnx_scan_over_stacked_layers(getkey):
    """A stack of stateful layers built with nnx.vmap, applied in turn by nnx.scan,
    against `lax.scan` over the natively stacked models."""
    keys = jr.split(getkey(), 3)

    def make(key):
        return eqx.nn.make_with_state(Block)(key)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return adapters.to_nnx(*make(key), **BATCH)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
        return layer(x)

    stack = create(keys)
    models, states = eqx.filter_vmap(make)(keys)
    params, static = eqx.partition(models, eqx.is_array)

    def body(x, layer):
        p, s = layer
        return native_apply(eqx.combine(p, static), s, x)

    x = jr.normal(getkey(), (5, 4))
    for _ in range(2):
        out = forward(x, stack)
        want, states = jax.lax.scan(body, x, (params, states))
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
        assert_close(module_stats(stack), native_stats(models, states))


# ---------------------------------------------------------------------------
# 6. Inside a larger NNX model.


class Outer(nnx.Module):
    def __init__(self, make, rngs):
        self.block = adapters.EquinoxToNNX(make=make, rngs=rngs, **BATCH)
        self.head = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.block(x)))


def test_inside_an_nnx_model(getkey):
    got_keys = []

    def make(key):
        got_keys.append(key)
        return eqx.nn.make_with_state(BNNet)(key)

    outer = Outer(make, nnx.Rngs(0))
    assert len(got_keys) == 1
    # The factory's key is the first draw of rngs.params().
    np.testing.assert_array_equal(
        jr.key_data(got_keys[0]), jr.key_data(nnx.Rngs(0).params())
    )
    model, state = eqx.nn.make_with_state(BNNet)(got_keys[0])
    assert_close(module_params(outer.block), native_params(model), exact=True)
    head_def, head_params = nnx.split(nnx.clone(outer.head))

    def native_loss(trainable, state, x, y):
        model, head_params = trainable
        out, state = native_apply(model, state, x)
        pred = nnx.merge(head_def, head_params)(jax.nn.relu(out))
        return jnp.mean((pred - y) ** 2), state

    @eqx.filter_jit
    def native_train(trainable, state, opt_state, x, y):
        (loss, state), grads = eqx.filter_value_and_grad(native_loss, has_aux=True)(
            trainable, state, x, y
        )
        params = eqx.filter(trainable, eqx.is_inexact_array)
        updates, opt_state = OPTIM.update(grads, opt_state, params)
        return eqx.apply_updates(trainable, updates), state, opt_state, loss

    optimizer = nnx.Optimizer(outer, OPTIM, wrt=nnx.Param)
    trainable = (model, head_params)
    opt_state = OPTIM.init(eqx.filter(trainable, eqx.is_inexact_array))
    x, ky = _data(getkey())
    y = jr.normal(ky, (5, 3))
    for _ in range(3):
        loss = nnx_step(outer, optimizer, x, y)
        trainable, state, opt_state, want = native_train(
            trainable, state, opt_state, x, y
        )
        np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
        assert_close(module_params(outer.block), native_params(trainable[0]))
        assert_close(module_stats(outer.block), native_stats(model, state))
        assert_close(nnx_flat(nnx.state(outer.head, nnx.Param)), nnx_flat(trainable[1]))
    outer.eval()
    out, _ = native_apply(eqx.nn.inference_mode(trainable[0]), state, x)
    head = nnx.merge(head_def, trainable[1])
    np.testing.assert_allclose(outer(x), head(jax.nn.relu(out)), rtol=RTOL, atol=ATOL)


def test_make_with_params_only_rngs(getkey):
    """A deterministic model built from a factory inside an NNX module whose `rngs`
    has only a `params` stream, as `EquinoxToNNX(make=...)`'s own error message
    advises (`rngs=nnx.Rngs(params=0)`) and as `nnx.Linear` takes."""
    rngs = nnx.Rngs(params=0)
    module = adapters.EquinoxToNNX(make=_mlp, rngs=rngs, vmap_axis=0)
    mlp = _mlp(nnx.Rngs(params=0).params())
    x, _ = _data(getkey())
    np.testing.assert_allclose(
        module(x), native_apply(mlp, None, x)[0], rtol=RTOL, atol=ATOL
    )


def test_make_with_a_model_that_takes_no_key(getkey):
    """`make=` needs `rngs`; a deterministic model whose call has no `key`
    parameter (as many Equinox models have) must still run: it gets no key."""
    got_keys = []

    def make(key):
        got_keys.append(key)
        return eqx.nn.make_with_state(Block)(key)

    module = adapters.EquinoxToNNX(make=make, rngs=nnx.Rngs(0), **BATCH)
    model, state = eqx.nn.make_with_state(Block)(got_keys[0])
    x = jr.normal(getkey(), (5, 4))
    for _ in range(2):
        want, state = native_apply(model, state, x)
        np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
        assert_close(module_stats(module), native_stats(model, state))


# ---------------------------------------------------------------------------
# 7. Composition both ways.


def test_to_equinox_of_to_nnx(getkey):
    model, state = eqx.nn.make_with_state(BNNet)(getkey(), "ema")
    composed, cstate = adapters.to_equinox(adapters.to_nnx(model, state, **BATCH))
    x, _ = _data(getkey())
    native = state
    for _ in range(2):
        out, cstate = composed(x, cstate)
        want, native = native_apply(model, native, x)
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    inner = composed.nnx_module(cstate)
    assert_close(module_stats(inner), native_stats(model, native))
    out, after = eqx.nn.inference_mode(composed)(x, cstate)
    want, _ = native_apply(eqx.nn.inference_mode(model), native, x)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(composed.nnx_module(after)), native_stats(model, native))


def test_to_equinox_of_to_nnx_dropout(getkey):
    """Without `key=`, the composition draws from the wrapper's own NNX stream, which
    advances in the Equinox state: the keys of `rngs["dropout"].fork()`."""
    case = CASES["dropout"]
    model, _ = case.build(getkey())
    composed, cstate = adapters.to_equinox(_wrap(case, model, None))
    native_keys = _native_keys(case)
    x, _ = _data(getkey())
    call = eqx.filter_jit(lambda m, x, s: m(x, s))
    outs = []
    for _ in range(2):
        out, cstate = call(composed, x, cstate)
        want, _ = native_apply(model, None, x, native_keys())
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
        outs.append(out)
    assert not np.array_equal(outs[0], outs[1])
    out, _ = eqx.nn.inference_mode(composed)(x, cstate)
    want, _ = native_apply(eqx.nn.inference_mode(model), None, x)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_to_nnx_of_to_equinox(getkey):
    nnx_module = NNXNet(nnx.Rngs(0))
    native = nnx.clone(nnx_module)
    wrapped = adapters.to_nnx(*adapters.to_equinox(nnx_module))
    x, _ = _data(getkey())
    for _ in range(2):
        np.testing.assert_allclose(wrapped(x), native(x), rtol=RTOL, atol=ATOL)
    model, state = wrapped.equinox_model()
    inner = model.nnx_module(state)
    for got, want in [(inner.bn.mean, native.bn.mean), (inner.bn.var, native.bn.var)]:
        np.testing.assert_allclose(got[...], want[...], rtol=RTOL, atol=ATOL)
    wrapped.eval()
    native.eval()
    np.testing.assert_allclose(wrapped(x), native(x), rtol=RTOL, atol=ATOL)
    # The NNX module handed over was never called.
    np.testing.assert_array_equal(nnx_module.bn.mean[...], jnp.zeros(4))


# ---------------------------------------------------------------------------
# 8. Errors; after each, the module is unchanged and still usable.


def _snapshot(module):
    return {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(module))}


def _assert_unchanged(module, snapshot):
    now = _snapshot(module)
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert now[k] is v, k


def test_error_state_update_in_eval(getkey):
    model, state = eqx.nn.make_with_state(CountNet)(getkey())
    module = adapters.to_nnx(model, state, vmap_axis=0)
    x, _ = _data(getkey())
    module.eval()
    snapshot = _snapshot(module)
    with pytest.raises(adapters.AdapterError, match="in eval\nmode|eval mode"):
        module(x)
    _assert_unchanged(module, snapshot)
    with pytest.raises(adapters.AdapterError, match="in eval\nmode|eval mode"):
        nnx.jit(lambda m, x: m(x))(module, x)  # raised inside a trace
    _assert_unchanged(module, snapshot)
    module.train()  # still usable
    want, native = native_apply(model, state, x)
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(module), native_stats(model, native), exact=True)

    allowed = adapters.to_nnx(model, state, vmap_axis=0, update_in_eval=True)
    allowed.eval()
    native = state
    for _ in range(2):
        want, native = native_apply(eqx.nn.inference_mode(model), native, x)
        np.testing.assert_allclose(allowed(x), want, rtol=RTOL, atol=ATOL)
        assert_close(module_stats(allowed), native_stats(model, native), exact=True)
    assert int(module_stats(allowed)[("counter", "index")]) == 2


def test_error_stateful_model_without_state(getkey):
    model, _ = eqx.nn.make_with_state(BNNet)(getkey())
    with pytest.raises(adapters.AdapterError, match="has state but no `eqx.nn.State`"):
        adapters.to_nnx(model, **BATCH)


def test_error_batch_without_vmap_axis(getkey):
    mlp = _mlp(getkey())
    module = adapters.to_nnx(mlp)
    x, _ = _data(getkey())
    snapshot = _snapshot(module)
    with pytest.raises(adapters.AdapterError, match="vmap_axis=0"):
        module(x)
    _assert_unchanged(module, snapshot)
    np.testing.assert_array_equal(module(x[0]), mlp(x[0]))


@pytest.mark.parametrize(
    "options", [{"vmap_axis": 0}, {}], ids=["no_axis_name", "no_vmap_axis"]
)
def test_error_unbound_axis_name(options, getkey):
    model, state = eqx.nn.make_with_state(BNNet)(getkey())
    module = adapters.to_nnx(model, state, **options)
    x, _ = _data(getkey())
    snapshot = _snapshot(module)
    with pytest.raises(
        adapters.AdapterError, match="vmap_axis=0, axis_name='batch'"
    ) as info:
        module(x)
    assert "'batch'" in str(info.value)
    _assert_unchanged(module, snapshot)
    # Still usable: in eval mode BatchNorm reduces over no axis.
    module.eval()
    inference = eqx.nn.inference_mode(model)
    if options:
        want, _ = native_apply(inference, state, x)
        np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    else:
        want, _ = inference(x[0], state)
        np.testing.assert_allclose(module(x[0]), want, rtol=RTOL, atol=ATOL)
    _assert_unchanged(module, snapshot)


def test_error_per_example_state_update(getkey):
    model, state = eqx.nn.make_with_state(PerExampleState)(getkey())
    module = adapters.to_nnx(model, state, vmap_axis=0)
    x, _ = _data(getkey())
    snapshot = _snapshot(module)
    with pytest.raises(adapters.AdapterError, match="different state update"):
        module(x)
    _assert_unchanged(module, snapshot)
    want, _ = native_apply(model, state, x, update=False)
    np.testing.assert_allclose(module(x, update=False), want, rtol=RTOL, atol=ATOL)
    _assert_unchanged(module, snapshot)


def test_error_key_needed_without_rngs(getkey):
    model = DropNet(getkey())
    module = adapters.to_nnx(model, vmap_axis=0)
    x, _ = _data(getkey())
    snapshot = _snapshot(module)
    with pytest.raises(adapters.AdapterError, match="needs a `key`"):
        module(x)
    _assert_unchanged(module, snapshot)
    key = getkey()
    want, _ = native_apply(model, None, x, key)
    np.testing.assert_allclose(module(x, key=key), want, rtol=RTOL, atol=ATOL)
    module.eval()
    want, _ = native_apply(eqx.nn.inference_mode(model), None, x)
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)


def test_error_nnx_module_given():
    with pytest.raises(adapters.AdapterError, match="NNX already") as info:
        adapters.to_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    assert isinstance(info.value, TypeError)


def test_error_make_without_rngs():
    with pytest.raises(adapters.AdapterError, match=r"rngs\.params\(\)"):
        adapters.EquinoxToNNX(make=_mlp, vmap_axis=0)


@pytest.mark.parametrize(
    "rewrite, path, words",
    [
        ("shape", "batch_stats/index", ["float32[2]", "float32[4]"]),
        ("structure", "batch_stats/index", ["expected 1 arrays, got 2"]),
        ("pair", "batch_stats/other", ["expected 1 arrays, got 2"]),
        ("missing", "batch_stats/other", []),
        ("missing_updated", "batch_stats/other", []),
    ],
    ids=["shape", "structure", "pair", "missing", "missing_updated"],
)
def test_error_state_update_does_not_fit(rewrite, path, words, getkey):
    model, state = eqx.nn.make_with_state(RewriteNet)(getkey())
    module = adapters.to_nnx(model, state, vmap_axis=0)
    x, _ = _data(getkey())
    snapshot = _snapshot(module)
    with pytest.raises(adapters.AdapterError, match=path) as info:
        module(x, rewrite=rewrite)
    for word in words:
        assert word in str(info.value)
    _assert_unchanged(module, snapshot)
    want, native = native_apply(model, state, x)
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(module), native_stats(model, native), exact=True)


def test_error_variables_replaced_with_another_shape(getkey):
    model, state = eqx.nn.make_with_state(BNNet)(getkey())
    module = adapters.to_nnx(model, state, **BATCH)
    x, _ = _data(getkey())
    saved = jtu.tree_map(lambda v: v, nnx.state(module))  # new Variable objects
    other = adapters.to_nnx(*eqx.nn.make_with_state(BNNet)(getkey(), size=5), **BATCH)
    nnx.update(module, nnx.state(other, nnx.Param))
    snapshot = _snapshot(module)
    with pytest.raises(adapters.AdapterError, match="params/l1/weight") as info:
        module(x)
    assert "float32[4,3]" in str(info.value) and "float32[4,5]" in str(info.value)
    with pytest.raises(adapters.AdapterError, match="params/l1/weight"):
        module.equinox_model()
    _assert_unchanged(module, snapshot)  # the failed calls wrote nothing
    nnx.update(module, saved)
    want, native = native_apply(model, state, x)
    np.testing.assert_allclose(module(x), want, rtol=RTOL, atol=ATOL)
    assert_close(module_stats(module), native_stats(model, native))


# ---------------------------------------------------------------------------
# 9. The user's model and state are never mutated.


@pytest.mark.parametrize("name", STATEFUL + ["dropout", "int_buffers"])
def test_user_model_and_state_untouched(name, getkey):
    case = CASES[name]
    model, state = case.build(getkey())
    leaves = jtu.tree_leaves((model, state))
    copies = [np.array(x) for x in leaves if eqx.is_array(x)]
    module = _wrap(case, model, state)
    optimizer = nnx.Optimizer(module, OPTIM, wrt=nnx.Param)
    x, ky = _data(getkey())
    y = jr.normal(ky, (5, _out_size(name)))
    for _ in range(3):
        nnx_step(module, optimizer, x, y)
    module(x)  # eagerly too
    module.eval()
    module(x)
    after = jtu.tree_leaves((model, state))
    assert len(after) == len(leaves)
    for a, b in zip(after, leaves, strict=True):
        assert a is b
    arrays = [x for x in after if eqx.is_array(x)]
    for a, c in zip(arrays, copies, strict=True):
        assert not a.is_deleted()
        np.testing.assert_array_equal(np.asarray(a), c)
    # And the module did train: its params moved away from the given ones.
    trained, _ = module.equinox_model()
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(native_params(trained).values(), native_params(model).values())
    )


class Masked(eqx.Module):
    """A deterministic model with a required keyword argument of its own."""

    linear: eqx.nn.Linear

    def __call__(self, x, *, mask):
        return self.linear(x) * mask


def test_a_missing_keyword_is_the_model_own_error(getkey):
    """Only an error about `key` becomes the adapter's "needs a key": a missing or
    unexpected keyword of the model's own stays Python's error, in both wrappers."""
    model = Masked(eqx.nn.Linear(3, 2, key=getkey()))
    x = jnp.ones(3)
    with pytest.raises(TypeError, match="mask") as info:
        adapters.to_nnx(model)(x)
    assert not isinstance(info.value, adapters.AdapterError)
    with pytest.raises(TypeError, match="foo") as info:
        adapters.to_nnx(eqx.nn.MLP(3, 2, 4, 1, key=getkey()))(x, foo=1)
    assert not isinstance(info.value, adapters.AdapterError)
    linen_module, variables = adapters.to_linen(model)
    with pytest.raises(TypeError, match="mask") as info:
        linen_module.apply(variables, x)
    assert not isinstance(info.value, adapters.AdapterError)
    # With the keyword, both compute what the model computes.
    mask = jnp.array([1.0, 0.0])
    want = model(x, mask=mask)
    np.testing.assert_array_equal(adapters.to_nnx(model)(x, mask=mask), want)
    np.testing.assert_array_equal(linen_module.apply(variables, x, mask=mask), want)


class Sampler(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x, *, key):
        return self.linear(x) + jr.normal(key, (2,))


def test_a_key_in_eval_mode_is_asked_for_as_such(getkey):
    """In eval mode no key is drawn; a model that needs one anyway is told to get
    it from the call (not to build the module with a stream it already has)."""
    model = Sampler(eqx.nn.Linear(3, 2, key=getkey()))
    module = adapters.to_nnx(model, rngs=nnx.Rngs(dropout=0))
    module.eval()
    with pytest.raises(adapters.AdapterError, match="in eval mode") as info:
        module(jnp.ones(3))
    assert "module(x, key=key)" in str(info.value)
    key = getkey()
    np.testing.assert_array_equal(
        module(jnp.ones(3), key=key), model(jnp.ones(3), key=key)
    )


def test_state_of_another_model(getkey):
    """A state made for another model (with an index of a layer whose initial value
    `make_with_state` deleted) is an AdapterError, not a KeyError."""

    class Counter(eqx.Module):
        index: eqx.nn.StateIndex

        def __init__(self):
            self.index = eqx.nn.StateIndex(jnp.array(0))

        def __call__(self, x, state):
            return x, state

    model, _ = eqx.nn.make_with_state(Counter)()
    _, other_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(adapters.AdapterError, match="made for another model"):
        adapters.to_nnx(model, other_state)


def test_a_stateful_model_that_returns_no_state(getkey):
    """Called with its state, a model must return `(out, state)`: one that returns
    only its output gets the adapter's error, not an attribute error (nor a
    leading axis of size 2 split into `(out, state)`)."""

    class Forgets(eqx.Module):
        index: eqx.nn.StateIndex

        def __init__(self):
            self.index = eqx.nn.StateIndex(jnp.zeros(2))

        def __call__(self, x, state):
            return x + state.get(self.index)

    model, state = eqx.nn.make_with_state(Forgets)()
    with pytest.raises(adapters.AdapterError, match=r"must return `\(out, state\)`"):
        adapters.to_nnx(model, state)(jnp.ones((2, 2)))
    with pytest.raises(adapters.AdapterError, match=r"must return `\(out, state\)`"):
        adapters.to_nnx(model, state, vmap_axis=0)(jnp.ones((3, 2)))


class Scale(eqx.Module):
    def __call__(self, a, b):
        return a * b


def test_a_scalar_first_input_with_vmap_axis(getkey):
    """The batch size is read from the first input that has axes; a Python scalar
    input cannot be mapped over a batch axis, and JAX's `vmap` says so (not an
    attribute error of the adapter's)."""
    x = jr.normal(getkey(), (4, 3))
    scales = jnp.arange(4.0)
    out = adapters.to_nnx(Scale(), vmap_axis=0)(scales, x)
    np.testing.assert_array_equal(out, jax.vmap(Scale())(scales, x))
    with pytest.raises(ValueError, match="rank"):
        adapters.to_nnx(Scale(), vmap_axis=0)(2.0, x)


def test_optimiser_masks_by_path(getkey):
    """Params are named by their path in the model, so NNX filters by path select
    them: an `nnx.Optimizer` over the weights only (`nnx.PathContains("weight")`)
    trains exactly what optax trains natively on the weights, and leaves the
    biases alone."""
    mlp = eqx.nn.MLP(3, 2, 8, 1, key=getkey())
    x, y = jr.normal(getkey(), (6, 3)), jr.normal(getkey(), (6, 2))
    module = adapters.to_nnx(mlp, vmap_axis=0)
    weights = nnx.All(nnx.Param, nnx.PathContains("weight"))
    optimizer = nnx.Optimizer(module, optax.sgd(0.1), wrt=weights)

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, weights))(module)
    optimizer.update(module, grads)

    def native_loss(model):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    native_grads = eqx.filter_grad(native_loss)(mlp)
    for i, layer in enumerate(mlp.layers):
        got = module.params["layers"][str(i)]
        want = layer.weight - 0.1 * native_grads.layers[i].weight
        np.testing.assert_allclose(got["weight"].get_value(), want, rtol=1e-6)
        assert got["bias"].get_value() is layer.bias  # untouched, the same array


def test_make_with_one_rng_stream(getkey):
    """`rngs=` may be one `nnx.RngStream`: the factory's key is drawn from it, as
    from `rngs.params()` for an `nnx.Rngs`, and the model is the factory's."""
    seen = []

    def make(key):
        seen.append(key)
        return eqx.nn.MLP(3, 2, 8, 1, key=key)

    stream = nnx.Rngs(params=3).params
    expected_key = nnx.Rngs(params=3).params()
    module = adapters.EquinoxToNNX(make=make, rngs=stream, vmap_axis=0)
    np.testing.assert_array_equal(
        jax.random.key_data(seen[0]), jax.random.key_data(expected_key)
    )
    native = eqx.nn.MLP(3, 2, 8, 1, key=expected_key)
    x = jr.normal(getkey(), (4, 3))
    np.testing.assert_array_equal(module(x), jax.vmap(native)(x))
