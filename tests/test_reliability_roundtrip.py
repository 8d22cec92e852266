"""Property-based round trips over random linen variable collections and dtypes.

Hypothesis draws linen variables `{collection: nested dict}` (1-3 collections, 0-3
levels of nesting, empty dicts, a key `"a/b"` next to a nested `"a" -> "b"`) whose
leaves are numpy and JAX arrays of every dtype JAX keeps in 32-bit mode (zero-size
shapes included, arbitrary bits: NaN payloads, -0.0, infinities), Python scalars,
weakly typed JAX arrays, typed PRNG keys (and arrays of them) and legacy raw keys.

Every property is checked against the native side, never against the adapter's
own output alone: the variables themselves, linen's own `apply`, or the Equinox
model called natively. "Equal" means the same tree (as plain dicts), the same shape,
dtype and weak type, the same bits (typed keys by `jax.random.key_data` and their
implementation) and, where nothing needs to be converted, the very same object.
"""

import math
from collections.abc import Mapping

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, HealthCheck, settings, strategies as st

import adapters


COLLECTIONS = ["params", "batch_stats", "cache", "stats"]
KEYS = ["a", "b", "a/b", "kernel", "Dense_0", "0", ""]
DTYPES = [
    jnp.float32,
    jnp.bfloat16,
    jnp.float16,
    jnp.int8,
    jnp.int32,
    jnp.uint8,
    jnp.bool_,
    jnp.complex64,
]
SHAPES = [(), (1,), (3,), (0,), (2, 0), (2, 3), (1, 2, 2)]
X = jnp.ones((2,), jnp.float32)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- strategies --------------------------------------------------------------------


@st.composite
def numpy_arrays(draw):
    """A numpy array of one of `DTYPES` with arbitrary bits (shrinks to zeros)."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.sampled_from(SHAPES))
    size = math.prod(shape)
    nbytes = size * dtype.itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    data = np.frombuffer(raw, np.uint8).copy()
    if dtype == np.bool_:
        data = (data % 2).astype(np.bool_)
    else:
        data = data.view(dtype)
    return data.reshape(shape)


def jax_arrays():
    return numpy_arrays().map(jnp.asarray)


def python_floats():
    """Python floats that JAX (in 32-bit mode) holds as float32 without overflow:
    every float32 value (NaN, infinities, -0.0, subnormals), and doubles that round
    to one. (A larger double overflows to inf with numpy's RuntimeWarning, natively
    in linen just the same.)"""
    return st.one_of(st.floats(width=32), st.floats(-1e38, 1e38))


def python_scalars():
    return st.one_of(st.integers(-(2**31), 2**31 - 1), python_floats(), st.booleans())


def weak_arrays():
    """JAX arrays made from Python scalars (weakly typed), also broadcast to a
    shape (broadcasting keeps the weak type)."""
    scalar = st.one_of(python_floats(), st.integers(-(2**31), 2**31 - 1))
    shape = st.sampled_from([(), (2,), (0,)])
    return st.builds(
        lambda s, shape: jnp.broadcast_to(jnp.asarray(s), shape), scalar, shape
    )


def typed_keys():
    seed = st.integers(0, 2**31 - 1)
    impl = st.sampled_from(["threefry2x32", "rbg"])
    one = st.builds(lambda s, i: jax.random.key(s, impl=i), seed, impl)
    split = st.builds(
        lambda s, i, n: jax.random.split(jax.random.key(s, impl=i), n),
        seed,
        impl,
        st.sampled_from([0, 1, 3]),
    )
    return st.one_of(one, split)


def raw_keys():
    return st.integers(0, 2**31 - 1).map(jax.random.PRNGKey)


def array_leaves():
    """Every kind of array leaf (no Python scalars)."""
    return st.one_of(
        numpy_arrays(), jax_arrays(), weak_arrays(), typed_keys(), raw_keys()
    )


def leaves():
    """Every kind of leaf, numpy and JAX arrays weighted up (one dtype of eight
    each)."""
    arrays = st.one_of(numpy_arrays(), jax_arrays())
    return st.one_of(arrays, arrays, arrays, array_leaves(), python_scalars())


def trees(depth, leaf, min_size=0):
    """A nested dict, `depth` levels of dicts at most below the top; inner dicts
    may be empty."""
    if depth == 0:
        return st.dictionaries(
            st.sampled_from(KEYS), leaf, min_size=min_size, max_size=4
        )
    return st.dictionaries(
        st.sampled_from(KEYS),
        st.one_of(leaf, trees(depth - 1, leaf)),
        min_size=min_size,
        max_size=4,
    )


@st.composite
def collections_trees(draw, leaf):
    """One collection: empty one time in ten; sometimes with `"a/b"` next to a
    nested `"a" -> "b"`."""
    if draw(st.integers(0, 9)) == 7:  # not a boundary value, which hypothesis favours
        return {}
    tree = draw(st.integers(0, 3).flatmap(lambda d: trees(d, leaf, min_size=1)))
    if draw(st.booleans()):
        tree = {**tree, "a/b": draw(leaf), "a": {"b": draw(leaf)}}
    return tree


@st.composite
def linen_cases(draw):
    """`(variables, trainable)`: linen variables and a subset of their collections."""
    names = draw(
        st.lists(st.sampled_from(COLLECTIONS), min_size=1, max_size=3, unique=True)
    )
    variables = {name: draw(collections_trees(leaves())) for name in names}
    chosen = draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    trainable = tuple(name for name, t in zip(names, chosen) if t)
    return variables, trainable


# --- comparisons -------------------------------------------------------------------


def plain(tree):
    """Mappings (`FrozenDict`s included) as plain dicts; leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    return tree


def only_plain_dicts(tree):
    if isinstance(tree, Mapping):
        return type(tree) is dict and all(map(only_plain_dicts, tree.values()))
    return True


def is_key(x):
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_scalar(x):
    return isinstance(x, (bool, int, float, complex))


def as_array(x):
    """What a leaf is as an array: Python scalars as `jnp.asarray` makes them."""
    return jnp.asarray(x) if is_scalar(x) else x


def bits(x):
    if is_key(x):
        return str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)).tobytes()
    return np.asarray(x).tobytes()


def assert_leaf_equal(got, want, where):
    """Same shape, dtype, weak type and bits (NaN-safe): `want` is the native leaf."""
    want = as_array(want)
    got = as_array(got)
    assert tuple(got.shape) == tuple(want.shape), where
    assert got.dtype == want.dtype, (where, got.dtype, want.dtype)
    assert getattr(got, "weak_type", False) == getattr(want, "weak_type", False), where
    assert bits(got) == bits(want), where


def assert_trees_equal(got, want, *, same_jax_arrays=False):
    """Leaf by leaf, with the tree structure as plain dicts; with `same_jax_arrays`,
    every JAX-array leaf of `want` must be the very object in `got`."""
    got, want = plain(got), plain(want)
    assert jtu.tree_structure(got) == jtu.tree_structure(want)
    for (path, w), g in zip(jtu.tree_leaves_with_path(want), jtu.tree_leaves(got)):
        where = jtu.keystr(path)
        assert_leaf_equal(g, w, where)
        if same_jax_arrays and isinstance(w, jax.Array):
            assert g is w, f"{where}: a copy, not the variable's own array"


class Echo(nn.Module):
    """Returns every variable collection it is applied with."""

    @nn.compact
    def __call__(self, x):
        return self.variables


# --- ToEquinox: linen variables -> Equinox -> linen variables ----------------------


@SETTINGS
@given(linen_cases())
def test_linen_variables_round_trip_bit_exact(case):
    """`to_equinox(..., variables=v, trainable=T)` then `linen_variables(state)` gives
    back `v` exactly: the same plain-dict tree, dtypes (Python scalars as
    `jnp.asarray` types them, weak type included), bits, and the caller's own JAX
    arrays (no copy); every leaf is a JAX array. `with_linen_variables(v)` and
    `with_linen_variables` of the returned dict give `v` again."""
    variables, trainable = case
    model, state = adapters.to_equinox(Echo(), variables=variables, trainable=trainable)
    assert set(model.variables) == set(trainable)
    assert set(model.state_indices) == set(variables) - set(trainable)

    got = model.linen_variables(state)
    assert only_plain_dicts(got)
    assert all(isinstance(x, jax.Array) for x in jtu.tree_leaves(got))
    assert_trees_equal(got, variables, same_jax_arrays=True)

    model2, state2 = model.with_linen_variables(variables)
    assert_trees_equal(model2.linen_variables(state2), variables, same_jax_arrays=True)
    model3, state3 = model.with_linen_variables(got)
    assert_trees_equal(model3.linen_variables(state3), variables, same_jax_arrays=True)


@SETTINGS
@given(linen_cases())
def test_call_equals_native_apply(case):
    """The wrapped call `model(x, state)` returns what linen's own
    `Echo().apply(v, x)` returns, leaf by leaf (Python scalars, which linen hands
    back as they are, compared as `jnp.asarray` of them), and leaves the state's
    collections as they were."""
    variables, trainable = case
    model, state = adapters.to_equinox(Echo(), variables=variables, trainable=trainable)
    out, new_state = model(X, state)
    native = Echo().apply(variables, X)
    assert_trees_equal(out, native)
    got = model.linen_variables(new_state)
    assert_trees_equal(got, variables, same_jax_arrays=True)


def _inexact(leaf):
    leaf = as_array(leaf)
    return not is_key(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)


@SETTINGS
@given(linen_cases())
def test_trainable_leaves_are_exactly_the_inexact_ones(case):
    """In `eqx.filter(model, eqx.is_inexact_array)`, which `eqx.filter_grad` and
    optax train, the trainable collections hold an array at every floating or
    complex leaf of `v` (Python floats and weak arrays included), that leaf's own
    value, and nothing at integer, bool and key leaves; state collections are not
    in the model at all. `eqx.filter_grad` through the call gives each of them its
    gradient."""
    variables, trainable = case
    model, state = adapters.to_equinox(Echo(), variables=variables, trainable=trainable)
    filtered = eqx.filter(model, eqx.is_inexact_array)
    assert set(filtered.variables) == set(trainable)
    for collection in trainable:
        want = plain(variables[collection])
        got = filtered.variables[collection]
        assert jtu.tree_structure(got, is_leaf=lambda x: x is None) == (
            jtu.tree_structure(want)
        )
        flat = jtu.tree_leaves(got, is_leaf=lambda x: x is None)
        for (path, w), g in zip(jtu.tree_leaves_with_path(want), flat):
            where = f"{collection}{jtu.keystr(path)}"
            if _inexact(w):
                assert eqx.is_inexact_array(g), f"{where}: {w!r} would not be trained"
                assert_leaf_equal(g, w, where)
            else:
                assert g is None, f"{where}: {w!r} would be trained"
    # Only trainable collections' leaves are arrays of the model at all.
    n_model_arrays = len(jtu.tree_leaves(eqx.filter(model, eqx.is_array)))
    n_trainable = sum(len(jtu.tree_leaves(variables[c])) for c in trainable)
    assert n_model_arrays == n_trainable

    # And `eqx.filter_grad` does train them: d/dw of sum(real(w)) over every
    # inexact leaf the call returns is 1 at each of them (whatever their values).
    def loss(model, state):
        out, _ = model(X, state)
        inexact = [o for o in jtu.tree_leaves(out) if eqx.is_inexact_array(o)]
        return sum((jnp.real(o).astype(jnp.float32).sum() for o in inexact), 0.0)

    grads = eqx.filter_grad(loss)(model, state)
    for collection in trainable:
        want = plain(variables[collection])
        flat = jtu.tree_leaves(grads.variables[collection], is_leaf=lambda x: x is None)
        for (path, w), g in zip(jtu.tree_leaves_with_path(want), flat):
            if _inexact(w):
                where = f"{collection}{jtu.keystr(path)}"
                assert g.dtype == as_array(w).dtype, where
                assert g.shape == as_array(w).shape, where
                assert np.all(np.asarray(g) == 1), (where, g)


@SETTINGS
@given(linen_cases())
def test_filter_jit_equals_eager_call(case):
    """Under `eqx.filter_jit`, the wrapped call returns the same tree, dtypes, weak
    types and bits as the eager call, and as linen's native `apply`; the returned
    state holds the same variables."""
    variables, trainable = case
    model, state = adapters.to_equinox(Echo(), variables=variables, trainable=trainable)
    eager, _ = model(X, state)
    jitted, jit_state = eqx.filter_jit(lambda m, s: m(X, s))(model, state)
    assert_trees_equal(jitted, eager)
    assert_trees_equal(jitted, Echo().apply(variables, X))
    assert_trees_equal(model.linen_variables(jit_state), variables)


def test_float64_is_refused_naming_the_path():
    """Numpy float64 (which JAX in 32-bit mode would narrow to float32) is refused,
    naming the collection and path, whether trainable or state."""
    variables = {
        "params": {"a": {"b": np.zeros(2, np.float32)}, "a/b": np.zeros(2, np.float64)},
        "cache": {"n": 3},
    }
    for trainable in [("params",), ()]:
        with pytest.raises(adapters.AdapterError, match="(?s)params/'a/b'.*float64"):
            adapters.to_equinox(Echo(), variables=variables, trainable=trainable)


# --- ToLinen: Equinox model -> linen variables -> Equinox model --------------------


class DictModel(eqx.Module):
    """An Equinox model holding a nested dict of arrays and, optionally, state."""

    d: dict
    index: eqx.nn.StateIndex | None

    def __init__(self, d, state_tree):
        self.d = d
        self.index = None if state_tree is None else eqx.nn.StateIndex(state_tree)

    def __call__(self, x, state=None):
        if self.index is None:
            return self.d
        return (self.d, state.get(self.index)), state


@st.composite
def equinox_cases(draw):
    """`(model, state)`: a `DictModel` of random array leaves, with or without a
    (non-empty) state of random array leaves."""
    d = draw(collections_trees(array_leaves()))
    if draw(st.booleans()):
        state_tree = draw(collections_trees(array_leaves()))
        if not jtu.tree_leaves(state_tree):
            state_tree = {"n": draw(array_leaves())}
        return eqx.nn.make_with_state(DictModel)(d, state_tree)
    return DictModel(d, None), None


@SETTINGS
@given(equinox_cases())
def test_to_linen_round_trip_and_apply_equal_native(case):
    """`to_linen(model, state)` and back with `equinox_model(variables)` gives the
    same model and state: the same pytree, every array leaf the very same object
    (so bit-exact); and `linen_module.apply(variables, x)` returns what the Equinox
    model returns when called natively, leaf by leaf."""
    model, state = case
    # The native call gets a State of its own (the same arrays): an `eqx.nn.State`
    # may be used only once after an update, and the wrapper's copy is separate.
    native_state = None if state is None else jtu.tree_map(lambda x: x, state)
    linen_module, variables = adapters.to_linen(model, state)

    model2, state2 = linen_module.equinox_model(variables)
    assert jtu.tree_structure(model2) == jtu.tree_structure(model)
    for (path, w), g in zip(jtu.tree_leaves_with_path(model), jtu.tree_leaves(model2)):
        assert g is w, f"model{jtu.keystr(path)}: not the model's own array"
    if state is None:
        assert state2 is None
    else:
        assert jtu.tree_structure(state2) == jtu.tree_structure(state)
        for (path, w), g in zip(
            jtu.tree_leaves_with_path(state), jtu.tree_leaves(state2)
        ):
            assert g is w, f"state{jtu.keystr(path)}: not the state's own array"

    out = linen_module.apply(variables, X)
    if state is None:
        assert_trees_equal(out, model(X))
    else:
        native_out, _ = model(X, native_state)
        assert_trees_equal(out, native_out)
