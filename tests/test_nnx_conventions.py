"""`adapters.NNXToEquinox` follows `ToEquinox`'s conventions: `key=` (keyword only),
`capture=` by collection name or NNX type, clear errors for `jax.jit` of the whole
model, the repr of an ensemble, and checkpoints of typed RNG keys. Every behaviour
is compared against native NNX.

The native side always runs on `nnx.clone(module)`; the module handed to
`to_equinox` is never called.
"""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

import adapters


class Net(nnx.Module):
    """Two dropout streams and batch statistics: RNG state and other state."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 8, rngs=rngs)
        self.drop1 = nnx.Dropout(0.5, rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
        self.drop2 = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return self.drop2(self.norm(self.drop1(self.linear(x))))


class Loss(nnx.Intermediate):
    """A variable type of the user's own, with no registered collection name."""


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = self.linear(x)
        self.sow(nnx.Intermediate, "h", h)
        return h


class Sows(nnx.Module):
    def __init__(self, rngs):
        self.block = Block(rngs)
        self.norm = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        h = self.block(x)
        self.sow(nnx.Intermediate, "top", h.sum())
        self.sow(Loss, "l2", jnp.mean(h**2))
        return jax.nn.relu(self.norm(h))


def _x(i, shape=(5, 3)):
    return jr.normal(jr.key(100 + i), shape)


def _no_keys(tree):
    """Typed PRNG keys as their raw data, so that chex can compare them."""

    def f(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jr.key_data(x)
        return x

    return jax.tree.map(f, tree)


def _assert_equal(a, b):
    chex.assert_trees_all_equal(_no_keys(a), _no_keys(b), strict=True)


def _flat(pure):
    """A nested dict of arrays as `{path: array}`, paths as NNX writes them."""
    return {
        tuple(k.key for k in path): leaf
        for path, leaf in jtu.tree_flatten_with_path(pure)[0]
    }


def _native_state(module, kind=nnx.Not(nnx.Param)):
    """A native module's variables of `kind`, as `{path: value}`."""
    return {
        tuple(path): variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(module, kind))
    }


_OTHER = nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.RngState))


def _wrapped_state(model, state, kind):
    """The wrapped state's entries that are of `kind` in a native module."""
    paths = set(_native_state(Net(nnx.Rngs(0)), kind))
    return {p: x for p, x in _flat(state.get(model.state_index)).items() if p in paths}


def _copy(state):
    """A state of our own holding the same arrays: an eager call consumes its
    state, and some tests call twice from the same one."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------
# key=


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_key_reproduces_native_reseed(jit):
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    call = lambda m, x, s, k: m(x, s, key=k)  # noqa: E731
    native_call = lambda m, x: m(x)  # noqa: E731
    if jit:  # jitted on both sides: XLA may fuse the statistics differently
        call, native_call = eqx.filter_jit(call), nnx.jit(native_call)
    native = nnx.clone(module)
    stored = _wrapped_state(model, state, nnx.RngState)
    assert len(stored) == 4  # two streams: a key and a count each
    for i in range(3):
        key = jr.key(10 + i)
        adapters.nnx_reseed(native, key)
        expected = native_call(native, _x(i))
        before = _flat(state.get(model.state_index))
        out, state = call(model, _x(i), state, key)
        _assert_equal(out, expected)
        # Every other variable updates as natively (here the batch statistics).
        _assert_equal(
            _wrapped_state(model, state, _OTHER), _native_state(native, _OTHER)
        )
        # The RNG variables are returned as they were: neither used nor advanced.
        after = _flat(state.get(model.state_index))
        for path in stored:
            if jit:
                _assert_equal(after[path], stored[path])
            else:
                assert after[path] is before[path] is stored[path], path


def test_key_decides_the_randomness():
    model, state = adapters.to_equinox(Net(nnx.Rngs(0)))
    x = _x(0)
    a, state = model(x, state, key=jr.key(1))
    b, state = model(x, state, key=jr.key(1))
    c, state = model(x, state, key=jr.key(2))
    _assert_equal(a, b)  # batch statistics in training mode: the key decides
    assert not jnp.array_equal(a, c)


def test_keyless_call_continues_the_stored_streams():
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    keyed = nnx.clone(module)
    for i in range(2):
        adapters.nnx_reseed(keyed, jr.key(i))
        keyed(_x(i))
        _, state = model(_x(i), state, key=jr.key(i))
    # Natively: the batch statistics of the keyed calls, the streams of a module
    # that never had them (the original's streams, untouched).
    native = nnx.clone(keyed)
    nnx.update(native, nnx.state(nnx.clone(module), nnx.RngState))
    for i in range(2, 4):
        out, state = model(_x(i), state)
        _assert_equal(out, native(_x(i)))
        _assert_equal(_flat(state.get(model.state_index)), _native_state(native))


def test_keyless_calls_are_unchanged():
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    native = nnx.clone(module)
    for i in range(2):
        out, state = model(_x(i), state)
        _assert_equal(out, native(_x(i)))
        _assert_equal(_flat(state.get(model.state_index)), _native_state(native))


def test_legacy_raw_key():
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    key = jr.PRNGKey(3)  # uint32[2]
    native = nnx.clone(module)
    adapters.nnx_reseed(native, key)
    out, _ = model(_x(0), state, key=key)
    _assert_equal(out, native(_x(0)))


def test_key_without_streams():
    module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    out, state = model(_x(0), state, key=jr.key(0))
    _assert_equal(out, nnx.clone(module)(_x(0)))


@pytest.mark.parametrize(
    "key",
    [jnp.ones(3), jr.split(jr.key(0), 2), 3],
    ids=["floats", "batch-of-keys", "int"],
)
def test_key_that_is_not_one_key(key):
    model, state = adapters.to_equinox(Net(nnx.Rngs(0)))
    with pytest.raises(
        adapters.AdapterError,
        match=r"`NNXToEquinox.__call__`'s `key` must be one JAX PRNG key",
    ) as err:
        model(_x(0), state, key=key)
    assert isinstance(err.value, TypeError)
    out, _ = model(_x(0), state)  # the state is still usable


# ---------------------------------------------------------------------------
# capture=


@pytest.mark.parametrize(
    "capture",
    ["intermediates", ("intermediates",), ["intermediates"], (nnx.Intermediate,)],
    ids=["name", "names", "list", "type"],
)
def test_capture_by_name_or_type(capture):
    module = Sows(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    native = nnx.clone(module)
    for i in range(2):
        (out, captured), state = model(_x(i), state, capture=capture)
        out_n, sown_n = nnx.capture(native, nnx.Intermediate)(_x(i))
        _assert_equal(out, out_n)
        _assert_equal(captured, {"intermediates": nnx.to_pure_dict(sown_n)})
        assert captured["intermediates"]["block"]["h"][0].shape == (5, 2)
        _assert_equal(_flat(state.get(model.state_index)), _native_state(native))
    assert set(state.get(model.state_index)) == {"norm"}  # never kept


def test_capture_several_types():
    module = Sows(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    (out, captured), state = model(_x(0), state, capture=("intermediates", Loss))
    out_n, sown_n, loss_n = nnx.capture(nnx.clone(module), nnx.Intermediate, Loss)(
        _x(0)
    )
    _assert_equal(out, out_n)
    # A type without a registered name is keyed by its class name.
    _assert_equal(
        captured,
        {
            "intermediates": nnx.to_pure_dict(sown_n),
            "Loss": nnx.to_pure_dict(loss_n),
        },
    )
    assert "Loss" not in nnx.variablelib.VariableTypeCache  # nothing registered


@pytest.mark.parametrize("capture", [False, None, ()])
def test_no_capture(capture):
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    out, state = model(_x(0), state, capture=capture)
    _assert_equal(out, nnx.clone(module)(_x(0)))


def test_capture_true_says_what_to_write():
    model, state = adapters.to_equinox(Sows(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"`capture=True`: `capture` takes") as err:
        model(_x(0), state, capture=True)
    assert isinstance(err.value, adapters.AdapterError)
    assert "capture='intermediates'" in str(err.value)
    assert "capture=(nnx.Intermediate,)" in str(err.value)


def test_capture_unknown_name_lists_the_known_names():
    model, state = adapters.to_equinox(Sows(nnx.Rngs(0)))
    with pytest.raises(adapters.AdapterError, match="names 'intermedates'") as err:
        model(_x(0), state, capture="intermedates")
    for name in ("batch_stats", "cache", "intermediates", "params", "perturbations"):
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    "capture, match",
    [
        ("batch_stats", r"names collection 'batch_stats' .* already holds"),
        (nnx.BatchStat, r"names collection 'batch_stats' .* already holds"),
        ("params", r"names collection 'params' .* already holds"),
        (("intermediates", nnx.Intermediate), "'intermediates' twice"),
        ((3,), "takes collection names or `nnx.Variable` types"),
        ({"intermediates": 1}, "takes collection names or `nnx.Variable` types"),
    ],
    ids=["state-name", "state-type", "trainable", "twice", "int", "dict"],
)
def test_capture_mistakes(capture, match):
    module = Sows(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    with pytest.raises(adapters.AdapterError, match=match):
        model(_x(0), state, capture=capture)
    # The state is still usable.
    (out, _), _ = model(_x(0), state, capture="intermediates")
    _assert_equal(out, nnx.capture(nnx.clone(module), nnx.Intermediate)(_x(0))[0])


def test_capture_held_names_the_paths():
    model, state = adapters.to_equinox(Sows(nnx.Rngs(0)))
    with pytest.raises(adapters.AdapterError) as err:
        model(_x(0), state, capture=nnx.BatchStat)
    assert "  state/norm/mean\n  state/norm/var\n" in str(err.value)


# ---------------------------------------------------------------------------
# jax.jit of the whole model, and the transformations that work.


def test_jax_jit_of_the_model_is_explained():
    model, state = adapters.to_equinox(Net(nnx.Rngs(0)))
    with pytest.raises(TypeError, match="An `NNXToEquinox` cannot be hashed") as err:
        jax.jit(model)(_x(0), state)
    assert isinstance(err.value, adapters.AdapterError)
    assert "eqx.filter_jit" in str(err.value) and "eqx.partition" in str(err.value)


def test_jax_jit_of_a_function_of_the_model_is_explained():
    model, state = adapters.to_equinox(Net(nnx.Rngs(0)))
    with pytest.raises(
        TypeError, match="field of this `NNXToEquinox` is a traced"
    ) as err:
        jax.jit(lambda m, x, s: m(x, s))(model, _x(0), state)
    assert isinstance(err.value, adapters.AdapterError)
    assert "eqx.filter_jit" in str(err.value) and "eqx.partition" in str(err.value)


def test_partition_pattern_under_jax_jit():
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    arrays, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def step(arrays, x, state, key):
        return eqx.combine(arrays, static)(x, state, key=key)

    native = nnx.clone(module)
    native_step = nnx.jit(lambda m, x: m(x))
    for i in range(2):
        adapters.nnx_reseed(native, jr.key(i))
        out, state = step(arrays, _x(i), state, jr.key(i))
        _assert_equal(out, native_step(native, _x(i)))
        _assert_equal(
            _wrapped_state(model, state, _OTHER), _native_state(native, _OTHER)
        )


def test_filter_jit_without_key():
    module = Net(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    native = nnx.clone(module)
    call = eqx.filter_jit(lambda m, x, s: m(x, s))
    native_call = nnx.jit(lambda m, x: m(x))
    for i in range(2):
        out, state = call(model, _x(i), state)
        _assert_equal(out, native_call(native, _x(i)))
        _assert_equal(_flat(state.get(model.state_index)), _native_state(native))


# An ensemble of wrappers built with `eqx.filter_vmap`; jitted (once for the file:
# one compilation instead of one per batched operation).
_make_ensemble = eqx.filter_jit(
    eqx.filter_vmap(lambda k: adapters.to_equinox(Net(nnx.Rngs(k))))
)


def _ensemble(n=4):
    keys = jr.split(jr.key(0), n)
    model, state = _make_ensemble(keys)
    return keys, model, state


def test_ensemble_with_filter_vmap():
    keys, model, state = _ensemble()
    call_keys = jr.split(jr.key(5), len(keys))
    call = eqx.filter_vmap(
        lambda m, s, k: m(_x(0), s, key=k), in_axes=(eqx.if_array(0), 0, 0)
    )
    out, state = eqx.filter_jit(call)(model, state, call_keys)
    for i, key in enumerate(keys):
        native = Net(nnx.Rngs(key))
        adapters.nnx_reseed(native, call_keys[i])
        expected = native(_x(0))
        # Jitted and batched on one side only: XLA may round differently.
        chex.assert_trees_all_close(out[i], expected, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a: a[i], _wrapped_state(model, state, _OTHER)),
            _native_state(native, _OTHER),
            rtol=1e-6,
            atol=1e-6,
        )


# ---------------------------------------------------------------------------
# The repr of an ensemble shows the state's batched shapes.


def _squash(text):
    return " ".join(text.split()).replace("( ", "(").replace(" )", ")")


def test_ensemble_repr_shows_batched_state():
    _, model, state = _ensemble(4)
    text = _squash(repr(model))
    batched = state.get(model.state_index)  # the native batched state
    assert jnp.shape(batched["norm"]["mean"]) == (4, 8)
    for path, leaf in _flat(batched).items():
        shown = eqx.tree_pformat({path[-1]: leaf})[1:-1]  # "'mean': f32[4,8]"
        assert _squash(shown) in text, (path, shown)
    assert "f32[8]" not in text  # no unbatched shape of the state is left
    assert "'kernel': f32[4,3,8]" in text
    # A single model shows its own shapes.
    single, single_state = adapters.to_equinox(Net(nnx.Rngs(0)))
    text = _squash(repr(single))
    assert "'mean': f32[8]" in text and "'key': key<fry>[]" in text


# ---------------------------------------------------------------------------
# Checkpoints of a state holding typed RNG keys: the documented recipe.


def _is_key(x):
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree):
    return jax.tree.map(lambda x: jr.key_data(x) if _is_key(x) else x, tree)


def _keys_from_data(tree, template):
    return jax.tree.map(
        lambda x, t: jr.wrap_key_data(x, impl=jr.key_impl(t)) if _is_key(t) else x,
        tree,
        template,
    )


def _assert_bit_exact(restored, original):
    flat_r = jtu.tree_flatten_with_path(restored)[0]
    flat_o = jtu.tree_flatten_with_path(original)[0]
    assert [p for p, _ in flat_r] == [p for p, _ in flat_o]
    keys = 0
    for (path, r), (_, o) in zip(flat_r, flat_o):
        if _is_key(o):
            keys += 1
            assert _is_key(r) and r.dtype == o.dtype, path  # a typed key again
            assert jnp.array_equal(jr.key_data(r), jr.key_data(o)), path
        else:
            assert jnp.asarray(r).dtype == jnp.asarray(o).dtype, path
            assert jnp.array_equal(r, o), path
    assert keys == 2  # the keys of the two dropout streams


def _saved():
    model, state = adapters.to_equinox(Net(nnx.Rngs(0)))
    _, state = model(_x(0), state)  # advanced streams and statistics
    expected, _ = model(_x(1), _copy(state))
    return model, state, expected


def test_checkpoint_equinox_serialisation(tmp_path):
    model, state, expected = _saved()
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, _keys_as_data((model, state)))
    raw = eqx.tree_deserialise_leaves(path, _keys_as_data((model, state)))
    model2, state2 = _keys_from_data(raw, (model, state))
    _assert_bit_exact((model2, state2), (model, state))
    out, _ = model2(_x(1), state2)
    _assert_equal(out, expected)


def _into_model(model, state, restored):
    """A checkpoint `{"variables": ..., "state": ...}` back into (model, state)."""
    restored = jax.tree.map(jnp.asarray, restored)
    model = eqx.tree_at(lambda m: m.variables, model, restored["variables"])
    state = eqx.tree_at(lambda s: s.get(model.state_index), state, restored["state"])
    return model, state


def test_checkpoint_flax_msgpack(tmp_path):
    model, state, expected = _saved()
    checkpoint = {"variables": model.variables, "state": state.get(model.state_index)}
    path = tmp_path / "checkpoint.msgpack"
    path.write_bytes(serialization.to_bytes(_keys_as_data(checkpoint)))
    raw = serialization.from_bytes(_keys_as_data(checkpoint), path.read_bytes())
    restored = _keys_from_data(raw, checkpoint)
    _assert_bit_exact(restored, checkpoint)
    model2, state2 = _into_model(model, state, restored)
    out, _ = model2(_x(1), state2)
    _assert_equal(out, expected)


def test_checkpoint_orbax(tmp_path):
    model, state, expected = _saved()
    checkpoint = {"variables": model.variables, "state": state.get(model.state_index)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", _keys_as_data(checkpoint))
        ckptr.wait_until_finished()
        target = jax.eval_shape(lambda: _keys_as_data(checkpoint))
        raw = ckptr.restore(tmp_path / "ckpt", target)
    restored = _keys_from_data(raw, checkpoint)
    _assert_bit_exact(restored, checkpoint)
    model2, state2 = _into_model(model, state, restored)
    out, _ = model2(_x(1), state2)
    _assert_equal(out, expected)
