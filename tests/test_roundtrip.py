"""Bit-exact round trips: linen variables -> `ToEquinox` (model + state) -> linen
variables.

"Bit-exact" (DESIGN.md, "Nothing lost") means: the same tree structure (partitioning
boxes and their names included), the same dtypes, the same bits (NaN payloads and
signed zeros included) and, where nothing was computed, the very same buffers (no
copy). After a call, the reference is linen's own `apply` with the same variables.
"""

import io
import math

import chex
import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import adapters


X = jnp.linspace(-2.0, 3.0, 8, dtype=jnp.float32).reshape(2, 4)


def _is_box(x):
    return isinstance(x, flax.core.meta.AxisMetadata)


def _same_buffer(got, want):
    """`got` is `want`, or at least a jax array sharing its device buffer."""
    if got is want:
        return True
    if not (isinstance(got, jax.Array) and isinstance(want, jax.Array)):
        return False
    if want.size == 0:  # nothing to share
        return got.shape == want.shape and got.dtype == want.dtype
    return got.unsafe_buffer_pointer() == want.unsafe_buffer_pointer()


def assert_bit_exact(got, want, *, same_buffers):
    """Same tree (boxes included), dtypes, shapes and bits; optionally the very same
    buffers."""
    assert jtu.tree_structure(got) == jtu.tree_structure(want)
    chex.assert_trees_all_equal(got, want, strict=True)
    for (path, g), w in zip(jtu.tree_leaves_with_path(got), jtu.tree_leaves(want)):
        where = jtu.keystr(path)
        assert g.dtype == w.dtype, where
        assert g.shape == w.shape, where
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes(), where
        if same_buffers:
            assert _same_buffer(g, w), where


# --- hypothesis: arbitrary variable trees ----------------------------------------

DTYPES = ["float32", "bfloat16", "float16", "int32", "int8", "uint8", "bool"]
COLLECTIONS = ["params", "batch_stats", "cache", "spectral_stats", "losses"]
KEYS = ["a", "b", "kernel", "Dense_0", "layers_1"]


@st.composite
def arrays(draw):
    """A jax array with arbitrary bits: NaNs with payloads, infinities, -0.0, ...;
    scalar and zero-size shapes included."""
    dtype = jnp.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    size = math.prod(shape)
    if dtype == np.bool_:
        data = rng.integers(0, 2, size).astype(np.bool_)
    else:
        data = rng.integers(0, 256, size * dtype.itemsize, dtype=np.uint8).view(dtype)
    return jnp.asarray(data.reshape(shape))


def trees(depth):
    """A nested dict of arrays, `depth` levels of dicts below the top (may be empty,
    and may hold empty dicts)."""
    if depth == 0:
        return st.dictionaries(st.sampled_from(KEYS), arrays(), max_size=3)
    return st.dictionaries(
        st.sampled_from(KEYS), st.one_of(arrays(), trees(depth - 1)), max_size=3
    )


variables_trees = st.dictionaries(
    st.sampled_from(COLLECTIONS), st.integers(0, 3).flatmap(trees), max_size=4
)


@settings(max_examples=30, deadline=None)
@given(
    variables=variables_trees,
    trainable=st.lists(st.sampled_from(COLLECTIONS), unique=True, max_size=3),
)
def test_roundtrip_hypothesis(variables, trainable):
    absent = [c for c in trainable if c not in variables and c != "params"]
    if absent:  # a name that is not a collection of the variables is refused
        with pytest.raises(adapters.AdapterError, match="not a collection of Dense"):
            adapters.to_equinox(nn.Dense(3), variables=variables, trainable=trainable)
        trainable = [c for c in trainable if c not in absent]
    model, state = adapters.to_equinox(
        nn.Dense(3), variables=variables, trainable=trainable
    )
    # Each collection is where it belongs: trainable leaves or one state entry each.
    assert set(model.variables) == set(variables) & set(trainable)
    assert set(model.state_indices) == set(variables) - set(trainable)
    for c, tree in model.variables.items():
        assert_bit_exact(tree, variables[c], same_buffers=True)

    out = model.linen_variables(state)
    assert type(out) is dict
    # Every collection (JAX pytrees of dicts do not depend on key order, so neither
    # does the model: a checkpoint that reorders collections wraps the same).
    assert set(out) == set(variables)
    assert_bit_exact(out, variables, same_buffers=True)

    # And through a jit boundary, as a training loop would hold (model, state).
    arrays_, static = eqx.partition((model, state), eqx.is_array)

    @jax.jit
    def roundtrip(arrays_):
        model, state = eqx.combine(arrays_, static)
        return model.linen_variables(state)

    assert_bit_exact(roundtrip(arrays_), variables, same_buffers=False)


def test_state_collections_in_unsorted_order(getkey):
    # Linen's init lists collections in creation order: here "cache" first.
    class CacheFirst(nn.Module):
        @nn.compact
        def __call__(self, x):
            c = self.variable("cache", "v", jnp.zeros, x.shape, jnp.float32)
            b = self.variable("batch_stats", "v", jnp.ones, x.shape, jnp.float32)
            c.value = c.value + 10.0
            return x * b.value

    x = jnp.ones((3,), jnp.float32)
    variables = CacheFirst().init(getkey(), x)
    assert list(variables) == ["cache", "batch_stats"]
    model, state = adapters.to_equinox(CacheFirst(), variables=variables)
    assert_bit_exact(model.linen_variables(state), variables, same_buffers=True)
    out, state = model(x, state)
    expected_out, updates = CacheFirst().apply(variables, x, mutable=True)
    np.testing.assert_array_equal(out, expected_out)
    assert_bit_exact(
        model.linen_variables(state), {**variables, **updates}, same_buffers=False
    )


def test_numpy_float64_state_collection(getkey):
    v = nn.BatchNorm(use_running_average=True).init(getkey(), X)
    v64 = jtu.tree_map(lambda a: np.asarray(a, np.float64), v)
    # In 32-bit mode the state would narrow float64 to float32: refused up front.
    with pytest.raises(
        adapters.AdapterError, match="(?s)batch_stats/mean.*jax_enable_x64"
    ):
        adapters.to_equinox(nn.BatchNorm(), variables=v64)
    # And so for trainable collections: they would be narrowed just the same.
    with pytest.raises(
        adapters.AdapterError,
        match="(?s)(params/scale|batch_stats/mean).*jax_enable_x64",
    ):
        adapters.to_equinox(
            nn.BatchNorm(), variables=v64, trainable=("params", "batch_stats")
        )


def test_numpy_leaves_same_dtype(getkey):
    """Numpy leaves of a dtype JAX keeps (float32, bfloat16, int8) round trip
    bit-exact, as JAX arrays: Equinox's filters and optax then see them (a numpy
    bfloat16 array is not an `eqx.is_inexact_array`)."""
    v = {
        "params": {
            "w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "h": np.ones(3, jnp.bfloat16),
        },
        "cache": {"n": np.array([-1, 2], np.int8)},
    }
    model, state = adapters.to_equinox(nn.Dense(3), variables=v)
    out = model.linen_variables(state)
    assert all(isinstance(x, jax.Array) for x in jtu.tree_leaves(out))
    assert_bit_exact(out, v, same_buffers=False)
    trained = eqx.filter(model, eqx.is_inexact_array).variables["params"]
    assert trained["h"] is not None and trained["w"] is not None


# --- round trips through calls, against linen's native apply ---------------------


class Stateful(nn.Module):
    """BatchNorm statistics plus non-float state (an int32 counter, a bool flag)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(3)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        count = self.variable("counters", "n", lambda: jnp.zeros((), jnp.int32))
        seen = self.variable("counters", "seen", lambda: jnp.zeros((3,), jnp.bool_))
        if train:
            count.value = count.value + 1
            seen.value = seen.value | (x[0] > 0)
        return nn.Dense(2)(x)


def test_roundtrip_after_call_that_changes_nothing(getkey):
    variables = Stateful().init(getkey(), X, train=False)
    model, state = adapters.to_equinox(
        Stateful(), variables=variables, train_kwarg="train"
    )
    model = eqx.nn.inference_mode(model)
    out, state = model(X, state)

    expected_out, updates = Stateful().apply(
        variables, X, train=False, mutable=["batch_stats", "counters"]
    )
    np.testing.assert_array_equal(out, expected_out)
    got = model.linen_variables(state)
    assert list(got) == list(variables)
    assert_bit_exact(got, {**variables, **updates}, same_buffers=False)
    assert_bit_exact(got, variables, same_buffers=False)  # nothing changed
    # The trainable arrays are still the caller's own buffers.
    assert_bit_exact(got["params"], variables["params"], same_buffers=True)


def test_roundtrip_after_calls_that_update_state(getkey):
    variables = Stateful().init(getkey(), X, train=False)
    model, state = adapters.to_equinox(
        Stateful(), variables=variables, train_kwarg="train"
    )
    native = variables
    for step in range(3):
        x = X * (step + 1.0)
        out, state = model(x, state)
        expected_out, updates = Stateful().apply(
            native, x, train=True, mutable=["batch_stats", "counters"]
        )
        native = {**native, **updates}
        np.testing.assert_array_equal(out, expected_out)
        assert_bit_exact(model.linen_variables(state), native, same_buffers=False)

    got = model.linen_variables(state)
    # The updates really happened (a dropped update would fail the checks above).
    assert int(got["counters"]["n"]) == 3
    assert got["counters"]["seen"].dtype == jnp.bool_
    assert not np.array_equal(
        got["batch_stats"]["BatchNorm_0"]["mean"],
        variables["batch_stats"]["BatchNorm_0"]["mean"],
    )
    assert_bit_exact(got["params"], variables["params"], same_buffers=True)


def test_frozendict_input(getkey):
    """A `FrozenDict` (at any depth) is accepted and returned as plain dicts with the
    very same leaves: `linen_variables` always returns `dict`s."""
    variables = Stateful().init(getkey(), X, train=False)
    frozen = flax.core.freeze(variables)
    assert isinstance(frozen["params"], flax.core.FrozenDict)
    # With example arguments, so the check against linen's init accepts it too.
    model, state = adapters.to_equinox(
        Stateful(), X, variables=frozen, train_kwarg="train"
    )
    got = model.linen_variables(state)

    def dict_types(tree):
        if isinstance(tree, (dict, flax.core.FrozenDict)):
            return (type(tree), {k: dict_types(v) for k, v in tree.items()})
        return None

    plain = jtu.tree_map(lambda a: a, variables)  # the same tree as plain dicts
    assert dict_types(got) == dict_types(plain)
    assert_bit_exact(got, plain, same_buffers=True)
    for g, f in zip(jtu.tree_leaves(got), jtu.tree_leaves(frozen)):
        assert g is f

    out, _ = eqx.nn.inference_mode(model)(X, state)
    np.testing.assert_array_equal(out, Stateful().apply(frozen, X, train=False))


# --- partitioning boxes ----------------------------------------------------------


class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(
            3,
            kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), (None, "model")
            ),
        )(x)
        x = nn.Dense(
            3,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
        )(x)
        # A box in a non-trainable collection, updated in training.
        m = self.variable(
            "batch_stats", "m", nn.with_partitioning(jnp.zeros, ("x",)), (3,)
        )
        if train:
            m.value = 0.5 * m.value + jnp.mean(x, axis=0)
        return x * m.value[None]


def _boxes(tree):
    """The boxes of a tree, by path: type and names."""
    flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=_is_box)
    return {jtu.keystr(p): (type(b).__name__, b.names) for p, b in flat if _is_box(b)}


def test_partitioning_boxes_survive(getkey):
    variables = Boxed().init(getkey(), X, train=False)
    boxes = _boxes(variables)
    assert boxes == {
        "['batch_stats']['m']": ("Partitioned", ("x",)),
        "['params']['Dense_0']['kernel']": ("Partitioned", (None, "model")),
        "['params']['Dense_1']['bias']": ("LogicallyPartitioned", ("mlp",)),
        "['params']['Dense_1']['kernel']": ("LogicallyPartitioned", ("embed", "mlp")),
    }
    model, state = adapters.to_equinox(
        Boxed(), X, variables=variables, train_kwarg="train"
    )
    assert _boxes({"params": model.variables["params"]}) == {
        k: v for k, v in boxes.items() if k.startswith("['params']")
    }
    assert_bit_exact(model.linen_variables(state), variables, same_buffers=True)

    # Output and gradient of the wrapped model = linen's, with the boxed variables.
    def loss(model, state):
        out, state = model(X, state)
        return jnp.sum(out * out), state

    (value, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
        model, state
    )

    def native_loss(params):
        out, updates = Boxed().apply(
            {**variables, "params": params}, X, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out * out), updates

    (expected_value, updates), expected_grads = jax.value_and_grad(
        native_loss, has_aux=True
    )(variables["params"])
    np.testing.assert_array_equal(value, expected_value)
    assert_bit_exact(grads.variables["params"], expected_grads, same_buffers=False)
    assert _boxes(grads.variables["params"]) == _boxes(variables["params"])

    # The boxed non-trainable variable survives the state update.
    got = model.linen_variables(new_state)
    assert _boxes(got) == boxes
    assert_bit_exact(got, {**variables, **updates}, same_buffers=False)
    assert not np.array_equal(
        got["batch_stats"]["m"].value, variables["batch_stats"]["m"].value
    )


# --- serialisation ---------------------------------------------------------------


def test_serialise_model_and_state(getkey):
    model, state = adapters.to_equinox(Stateful(), X, key=getkey(), train_kwarg="train")
    _, state = model(X, state)  # a state that differs from a fresh init
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (model, state))

    skeleton = adapters.to_equinox(Stateful(), X, key=getkey(), train_kwarg="train")
    before = skeleton[0].linen_variables(skeleton[1])
    with pytest.raises(AssertionError):  # so the test below can fail
        chex.assert_trees_all_equal(before, model.linen_variables(state))
    buffer.seek(0)
    model2, state2 = eqx.tree_deserialise_leaves(buffer, skeleton)

    assert_bit_exact(
        model2.linen_variables(state2),
        model.linen_variables(state),
        same_buffers=False,
    )
    out, _ = model(X, state)
    out2, _ = model2(X, state2)
    np.testing.assert_array_equal(out2, out)
