"""Every error of `adapters.to_equinox` / `ToEquinox.__call__`.

Each test triggers one mistake and checks that the message names what the design
contract promises (DESIGN.md, "Errors"): the collection, the path inside it, the
expected vs. got shape/dtype, and the fix. Where the message suggests a fix, the test
also checks that the fix works. The last tests check that neither a failed nor a
successful call mutates the user's objects.
"""

import copy
import re

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adapters


X = jnp.arange(8.0, dtype=jnp.float32).reshape(2, 4)


class Net(nn.Module):
    """Dense -> BatchNorm -> Dense: `params` and `batch_stats`."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(3)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


class DropNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))


class Noisy(nn.Module):
    """Uses an rng stream, "noise", that is not among the default `rng_streams`."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(3)(x)
        return y + jax.random.normal(self.make_rng("noise"), y.shape)


class CreatesAtApply(nn.Module):
    """Creates the collection "extra" only outside init."""

    @nn.compact
    def __call__(self, x):
        if not self.is_initializing():
            n = self.variable("extra", "n", lambda: jnp.zeros((), jnp.int32))
            n.value = n.value + 1
        return nn.Dense(3)(x)


class Sows(nn.Module):
    """Sows into "losses" at init and at apply: init stores it, so it becomes state
    and grows (a longer tuple) on the next call."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(3)(x)
        self.sow("losses", "l2", jnp.sum(y * y))
        return y


class TwoStates(nn.Module):
    """`params`, `batch_stats` and `cache` (created in sorted order)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
        c = self.variable("cache", "count", lambda: jnp.zeros((), jnp.int32))
        if train:
            c.value = c.value + 1
        return x


def _msg(*parts):
    """A `match=` regex requiring every part, in any order: literally, except that
    a space matches any run of whitespace (the messages wrap their lines)."""
    return "".join(
        "(?=[\\s\\S]*" + r"\s+".join(map(re.escape, p.split(" "))) + ")" for p in parts
    )


# --- the state argument ----------------------------------------------------------


def test_state_missing(getkey):
    model, _ = adapters.to_equinox(nn.Dense(3), X, key=getkey())
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "state as its last positional argument",
            "was missing",
            "out, state = model(x, state)",
        ),
    ):
        model()
    with pytest.raises(
        adapters.AdapterError,
        match=_msg("last positional argument was of type ArrayImpl", "make_with_state"),
    ):
        model(X)


def test_state_not_last(getkey):
    model, state = adapters.to_equinox(nn.Dense(3), X, key=getkey())
    with pytest.raises(
        adapters.AdapterError, match=_msg("state", "last positional argument")
    ):
        model(state, X)
    # A state before the last one (even with a state last) is reported by position.
    with pytest.raises(
        adapters.AdapterError,
        match=_msg("positional argument 0", "must be the last positional argument"),
    ):
        model(state, X, state)


def test_state_not_last_names_its_position(getkey):
    model, state = adapters.to_equinox(nn.Dense(3), X, key=getkey())
    with pytest.raises(adapters.AdapterError, match="positional argument 0"):
        model(state, X)


@pytest.mark.parametrize("not_state", [3, None, {"batch_stats": {}}, (1, 2)])
def test_last_argument_not_a_state(getkey, not_state):
    model, _ = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(f"of type {type(not_state).__name__}", "make_with_state", "last"),
    ):
        model(X, not_state)


def test_foreign_state_from_equinox_batchnorm(getkey):
    model, _ = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    _, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(
        adapters.AdapterError,
        match=_msg("does not hold its collection 'batch_stats'", "adapters.to_equinox"),
    ):
        model(X, eqx_state)
    with pytest.raises(adapters.AdapterError, match="'batch_stats'"):
        model.linen_variables(eqx_state)


def test_foreign_state_from_model_with_other_collections(getkey):
    model, _ = adapters.to_equinox(TwoStates(), X, key=getkey(), train_kwarg="train")
    assert set(model.state_indices) == {"batch_stats", "cache"}
    # Same marker for `batch_stats` (same class, same field), but no `cache`.
    _, other = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    with pytest.raises(
        adapters.AdapterError, match=_msg("does not hold its collection 'cache'")
    ):
        model(X, other)


def test_foreign_state_with_other_shapes(getkey):
    """Two `ToEquinox` models with one `batch_stats` each: Equinox's markers coincide
    (both are `ToEquinox.state_indices['batch_stats']`), so only the shapes tell the
    states apart."""
    model4, state4 = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    x5 = jnp.ones((2, 5), jnp.float32)

    class Wide(Net):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(5)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2)(x)

    _, state5 = adapters.to_equinox(Wide(), x5, key=getkey(), train_kwarg="train")
    assert jtu.tree_structure(state4) == jtu.tree_structure(state5)  # same markers
    message = _msg(
        "does not fit its collection 'batch_stats'",
        "batch_stats/BatchNorm_0/mean: expected float32[3], got float32[5]",
        "batch_stats/BatchNorm_0/var: expected float32[3], got float32[5]",
        "another model",
    )
    with pytest.raises(adapters.AdapterError, match=message):
        model4(X, state5)
    with pytest.raises(adapters.AdapterError, match=message):
        model4.linen_variables(state5)


# --- variables that do not fit the module ----------------------------------------


def test_variables_do_not_fit_all_problems_in_one_error(getkey):
    v = Net().init(getkey(), X, train=False)
    p, bs = v["params"], v["batch_stats"]
    bad = {
        "params": {
            "Dense_0": {"kernel": jnp.zeros((4, 4)), "bias": p["Dense_0"]["bias"]},
            "BatchNorm_0": p["BatchNorm_0"],
            # missing bias, an extra entry
            "Dense_1": {"kernel": p["Dense_1"]["kernel"], "extra": jnp.zeros(7)},
        },
        "batch_stats": {
            "BatchNorm_0": {
                "mean": bs["BatchNorm_0"]["mean"].astype(jnp.float16),
                "var": bs["BatchNorm_0"]["var"],
            }
        },
        "cache": {"a": jnp.zeros(1)},
    }
    with pytest.raises(adapters.AdapterError) as info:
        adapters.to_equinox(Net(), X, variables=bad, train_kwarg="train")
    message = str(info.value)
    expected_lines = [
        "params/Dense_0/kernel: expected float32[4,3], got float32[4,4]",
        "params/Dense_1/bias: missing (expected float32[2])",
        "params/Dense_1/extra: unexpected entry that the module does not have "
        "(float32[7])",
        "batch_stats/BatchNorm_0/mean: expected float32[3], got float16[3]",
        "cache: unexpected collection",
    ]
    for line in expected_lines:
        assert line in message, (line, message)
    assert "Net" in message
    assert "example arguments" in message  # the fix: right variables, or no check
    # Only the problems: the entries that fit are not reported.
    for fine in ["Dense_1/kernel", "BatchNorm_0/var", "Dense_0/bias", "scale"]:
        assert fine not in message, (fine, message)


def test_variables_missing_collection(getkey):
    v = Net().init(getkey(), X, train=False)
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "batch_stats: missing collection",
            "BatchNorm_0/mean: float32[3]",
            "BatchNorm_0/var: float32[3]",
        ),
    ):
        adapters.to_equinox(Net(), X, variables={"params": v["params"]}, train=False)


def test_variables_with_example_args_that_fit_are_accepted(getkey):
    # The check is not a false alarm: right variables pass, and are not copied.
    v = Net().init(getkey(), X, train=False)
    model, state = adapters.to_equinox(Net(), X, variables=v, train_kwarg="train")
    kernel = model.linen_variables(state)["params"]["Dense_0"]["kernel"]
    assert kernel is v["params"]["Dense_0"]["kernel"]


@pytest.mark.parametrize("variables", [[1, 2], jnp.zeros(3), "params"])
def test_variables_not_a_mapping(variables):
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "expected linen variables, a mapping", "variables={'params': params}"
        ),
    ) as info:
        adapters.to_equinox(nn.Dense(3), variables=variables)
    assert isinstance(info.value, TypeError)
    assert type(variables).__name__ in str(info.value)


@pytest.mark.parametrize("tree", [[jnp.zeros(3)], jnp.zeros(3), None])
def test_collection_not_a_mapping(tree):
    with pytest.raises(
        TypeError,
        match=_msg(
            "collection 'params' must be a nested mapping of arrays",
            f"got {type(tree).__name__}",
        ),
    ) as info:
        adapters.to_equinox(nn.Dense(3), variables={"params": tree})
    assert isinstance(info.value, adapters.AdapterError)


def test_collection_name_not_a_string():
    with pytest.raises(TypeError, match="collection names must be strings") as info:
        adapters.to_equinox(nn.Dense(3), variables={0: {}})
    assert isinstance(info.value, adapters.AdapterError)


def test_neither_key_nor_variables():
    with pytest.raises(
        adapters.AdapterError, match=_msg("Dense", "needs `key=`", "`variables=`")
    ):
        adapters.to_equinox(nn.Dense(3), X)


# --- the module argument ---------------------------------------------------------


def test_not_a_linen_module(getkey):
    linear = eqx.nn.Linear(4, 3, key=getkey())
    with pytest.raises(
        TypeError, match=_msg("flax.linen.Module", "equinox.nn._linear.Linear")
    ) as info:
        adapters.to_equinox(linear, X, key=getkey())
    assert isinstance(info.value, adapters.AdapterError)
    with pytest.raises(TypeError, match="flax.linen.Module"):
        adapters.to_equinox(lambda x: x, X, key=getkey())


def test_bound_linen_module(getkey):
    v = Net().init(getkey(), X, train=False)
    bound = Net().bind(v)
    with pytest.raises(
        adapters.AdapterError,
        match=_msg("unbound", "Net", "bound.unbind()", "variables=variables"),
    ) as info:
        adapters.to_equinox(bound, X, key=getkey())
    assert not isinstance(info.value, TypeError)
    # The suggested fix works.
    module, variables = bound.unbind()
    model, state = adapters.to_equinox(
        module, X, variables=variables, train_kwarg="train"
    )
    out, _ = eqx.nn.inference_mode(model)(X, state)
    np.testing.assert_array_equal(out, Net().apply(v, X, train=False))


# --- rng streams -----------------------------------------------------------------


def test_missing_key_for_dropout(getkey):
    model, state = adapters.to_equinox(DropNet(), X, key=getkey(), train_kwarg="train")
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "rng stream 'dropout'",
            "had no `key`",
            "key=jax.random.key(",
            "inference_mode",
        ),
    ):
        model(X, state)
    # The suggested fix works and is linen's native path with `linen_rngs`.
    key = getkey()
    out, _ = model(X, state, key=key)
    variables = model.linen_variables(state)
    expected = DropNet().apply(
        variables, X, train=True, rngs=adapters.linen_rngs(key, ("dropout",))
    )
    np.testing.assert_array_equal(out, expected)


def test_undeclared_rng_stream(getkey):
    model, state = adapters.to_equinox(Noisy(), X, key=getkey())
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "rng stream 'noise'",
            "not",
            "declared streams ('dropout',)",
            "rng_streams=('dropout', 'noise')",
        ),
    ):
        model(X, state, key=getkey())
    # The suggested fix works.
    model, state = adapters.to_equinox(
        Noisy(), X, key=getkey(), rng_streams=("dropout", "noise")
    )
    out, _ = model(X, state, key=getkey())
    assert out.shape == (2, 3)


def test_undeclared_rng_stream_without_key_mentions_rng_streams(getkey):
    model, state = adapters.to_equinox(Noisy(), X, key=getkey())
    with pytest.raises(adapters.AdapterError, match=re.escape("rng_streams=")):
        model(X, state)


# --- collections written during a call -------------------------------------------


def test_collection_created_during_apply(getkey):
    model, state = adapters.to_equinox(CreatesAtApply(), X, key=getkey())
    assert set(model.state_indices) == set()
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "does not hold as state",
            'collection "extra"',
            "capture=",
            "State collections: ()",
            "trainable collections: ('params',)",
        ),
    ):
        model(X, state)
    # The suggested fix works: the collection comes back, not stored in the state.
    (out, captured), _ = model(X, state, capture=("extra",))
    assert set(captured) == {"extra"}
    assert captured["extra"]["n"].dtype == jnp.int32
    assert int(captured["extra"]["n"]) == 1


def test_write_to_trainable_collection(getkey):
    model, state = adapters.to_equinox(
        Net(), X, key=getkey(), trainable=("params", "batch_stats"), train_kwarg="train"
    )
    assert set(model.variables) == {"params", "batch_stats"}
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "update a variable in collection 'batch_stats'",
            "trainable array leaves (`trainable=('batch_stats', 'params')`)",
            'collection "batch_stats" is immutable',
            "read-only",
            "leave it out of `trainable=`",
            "inference mode",
        ),
    ) as info:
        model(X, state)
    # Not the advice for collections created at apply (capture= would then fail).
    assert "capture=" not in str(info.value)
    # In inference mode nothing is written, so the call works.
    out, _ = eqx.nn.inference_mode(model)(X, state)
    np.testing.assert_array_equal(
        out, Net().apply(model.linen_variables(state), X, train=False)
    )


def test_sown_collection_at_init(getkey):
    """linen's init stores what `sow` writes (except `intermediates`): as state it
    would grow every call, so the wrapper refuses it at construction."""
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "Sows writes to ['losses'] during init only because they are mutable",
            "per_call=('intermediates', 'losses')",
            "capture=",
        ),
    ):
        adapters.to_equinox(Sows(), X, key=getkey())


def test_sown_collection_with_reduce_fn_at_init(getkey):
    """With a `reduce_fn` the sown value keeps its shape and would silently
    accumulate in the state: refused at construction too."""

    class Aux(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Dense(2)(x)
            self.sow(
                "losses",
                "aux",
                jnp.sum(y**2),
                reduce_fn=lambda a, b: a + b,
                init_fn=lambda: jnp.zeros(()),
            )
            return y

    with pytest.raises(adapters.AdapterError, match="per_call="):
        adapters.to_equinox(Aux(), X, key=getkey())
    key = getkey()
    model, state = adapters.to_equinox(
        Aux(), X, key=key, per_call=("intermediates", "losses")
    )
    (out, captured), state = model(X, state, capture="losses")
    native_out, native = Aux().apply(
        model.linen_variables(state), X, mutable=["losses"]
    )
    chex.assert_trees_all_equal((out, captured), (native_out, native))


def test_state_collection_grows_during_call(getkey):
    # Variables from linen's own init, wrapped without example arguments: the sown
    # collection is state, and the first call finds it growing.
    variables = Sows().init(getkey(), X)
    model, state = adapters.to_equinox(Sows(), variables=variables)
    assert set(model.state_indices) == {"losses"}  # init stored the sown value
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "changed collection 'losses'",
            "losses/l2/1: new entry",
            "fixed structure",
            "per_call=('intermediates', 'losses')",
            "capture=('losses',)",
        ),
    ):
        model(X, state)
    # The suggested fix: declare it per call (init then leaves it out, as linen's
    # init leaves out `intermediates`), and capture it at call time.
    key = getkey()
    model, state = adapters.to_equinox(
        Sows(), X, key=key, per_call=("intermediates", "losses")
    )
    assert set(model.state_indices) == set()
    params = {"params": model.variables["params"]}
    native_init = Sows().init(adapters.linen_rngs(key, ("params", "dropout")), X)
    chex.assert_trees_all_equal(params["params"], native_init["params"])
    for _ in range(2):  # and never accumulated across calls
        (out, captured), state = model(X, state, capture="losses")
    expected_out, expected = Sows().apply(params, X, mutable=["losses"])
    np.testing.assert_array_equal(out, expected_out)
    assert jtu.tree_structure(captured) == jtu.tree_structure(dict(expected))
    np.testing.assert_array_equal(
        captured["losses"]["l2"][0], expected["losses"]["l2"][0]
    )


def test_state_collection_changes_dtype_during_call(getkey):
    class Casts(nn.Module):
        @nn.compact
        def __call__(self, x):
            c = self.variable("cache", "acc", lambda: jnp.zeros((3,), jnp.float32))
            if not self.is_initializing():
                c.value = c.value.astype(jnp.float16)
            return x

    model, state = adapters.to_equinox(Casts(), X, key=getkey())
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(
            "changed collection 'cache'",
            "cache/acc: expected float32[3], got float16[3]",
            "fixed structure, shape and dtype",
            "cast the update back to the variable's dtype",
        ),
    ) as info:
        model(X, state)
    # Nothing grew, so the fix for growing collections is not suggested.
    assert "per_call" not in str(info.value)


def test_capture_a_state_collection(getkey):
    model, state = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    for name in ["batch_stats", "params"]:
        with pytest.raises(
            adapters.AdapterError,
            match=_msg(f"`capture=` names collection '{name}'", "already holds"),
        ):
            model(X, state, capture=("intermediates", name))


# --- argument names --------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("trainable", ("params", "params")),
        ("rng_streams", ("dropout", "noise", "dropout")),
        ("train_kwarg", ("train", "train")),
    ],
)
def test_duplicate_names(getkey, option, value):
    with pytest.raises(
        adapters.AdapterError,
        match=_msg(f"`{option}` names {value[0]!r} more than once", repr(value)),
    ):
        adapters.to_equinox(Net(), X, key=getkey(), **{option: value})


def test_duplicate_capture_names(getkey):
    model, state = adapters.to_equinox(Sows(), variables={"params": {}})
    with pytest.raises(
        adapters.AdapterError, match=_msg("`capture` names 'losses' more than once")
    ):
        model(X, state, capture=("losses", "losses"))


def test_names_not_strings(getkey):
    with pytest.raises(
        TypeError,
        match=_msg("`rng_streams` must be names (strings)", "got 3 of type int"),
    ) as info:
        adapters.to_equinox(Net(), X, key=getkey(), rng_streams=("dropout", 3))
    assert isinstance(info.value, adapters.AdapterError)


def test_duplicate_linen_rngs():
    with pytest.raises(
        adapters.AdapterError, match=_msg("`streams` names 'dropout' more than once")
    ):
        adapters.linen_rngs(jax.random.key(0), ("dropout", "dropout"))


# --- nothing the user owns is mutated --------------------------------------------


def _snapshot(variables):
    """Containers (by identity), leaves (by identity) and values (as numpy copies)."""
    containers = []

    def walk(tree):
        if isinstance(tree, dict):
            containers.append((tree, list(tree)))
            for v in tree.values():
                walk(v)

    walk(variables)
    leaves = jtu.tree_leaves(variables)
    return containers, leaves, [np.array(leaf, copy=True) for leaf in leaves]


def _assert_unchanged(variables, snapshot):
    containers, leaves, values = snapshot
    for container, keys in containers:
        assert list(container) == keys
    now = jtu.tree_leaves(variables)
    assert len(now) == len(leaves)
    for a, b, value in zip(now, leaves, values):
        assert a is b
        assert not a.is_deleted()
        np.testing.assert_array_equal(np.asarray(a), value, strict=True)


def test_user_objects_untouched_after_error_and_success(getkey):
    module = Net()
    module_copy = copy.deepcopy(module)
    module_dict = dict(vars(module))
    module_state = repr(module._state)
    variables = Net().init(getkey(), X, train=False)
    snapshot = _snapshot(variables)

    # An error: variables checked against the wrong example arguments.
    with pytest.raises(adapters.AdapterError):
        adapters.to_equinox(module, jnp.ones((2, 5)), variables=variables, train=False)
    _assert_unchanged(variables, snapshot)

    # Successful construction and several state-updating calls.
    model, state = adapters.to_equinox(
        module, X, variables=variables, train_kwarg="train"
    )
    for _ in range(3):
        _, state = model(X, state)
    # An error at call time.
    with pytest.raises(adapters.AdapterError):
        model(X, state, capture="batch_stats")
    _assert_unchanged(variables, snapshot)

    # The update did happen (so the check above is not vacuous) ...
    new_mean = model.linen_variables(state)["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.array_equal(new_mean, variables["batch_stats"]["BatchNorm_0"]["mean"])
    # ... and the linen module is untouched: unbound, same fields, same internals.
    assert module.scope is None
    assert module == module_copy
    assert vars(module).keys() == module_dict.keys()
    for name, value in module_dict.items():
        assert vars(module)[name] is value
    assert repr(module._state) == module_state
    assert model.linen_module is module


def test_old_state_is_rejected_by_equinox(getkey):
    """Passing an old state again raises Equinox's own guard (`eqx.nn.State.set`
    invalidates the state it was called on). This is expected behaviour, the same as
    for `eqx.nn.BatchNorm`; it is a plain `ValueError` from Equinox, not an
    `AdapterError`. To reuse a state on purpose, clone it first."""
    model, state = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    leaves, treedef = jtu.tree_flatten(state)
    clone = jtu.tree_unflatten(treedef, leaves)
    _, new_state = model(X, state)
    with pytest.raises(ValueError, match="Attempted to use old state") as info:
        model(X, state)
    assert not isinstance(info.value, adapters.AdapterError)
    with pytest.raises(ValueError, match="Attempted to use old state"):
        model.linen_variables(state)
    # Equinox's documented escape hatch works, and the new state is fine.
    model(X, clone)
    model(X, new_state)


def test_linen_habits_at_call_time(getkey):
    model, state = adapters.to_equinox(Net(), X, key=getkey(), train_kwarg="train")
    for habit in ("mutable", "rngs"):
        with pytest.raises(adapters.AdapterError, match=f"got `{habit}=`"):
            model(X, state, **{habit: ["batch_stats"]})
    with pytest.raises(adapters.AdapterError, match="keyword-only"):
        model(X, jax.random.key(0), state)


def test_params_only_variables_hint(getkey):
    params = Net().init(getkey(), X, train=False)["params"]
    with pytest.raises(
        adapters.AdapterError, match=re.escape("variables={'params': params, ...}")
    ):
        adapters.to_equinox(Net(), X, variables=params, train_kwarg="train")


def test_partitioning_box_holding_two_arrays(getkey):
    variables = nn.Dense(3).init(getkey(), X)
    kernel = variables["params"]["kernel"]
    box = nn.Partitioned((kernel, kernel), names=(None, "model"))
    bad = {"params": {**variables["params"], "kernel": box}}
    with pytest.raises(
        TypeError,
        match=_msg(
            "params/kernel: a partitioning box must hold one array",
            "this Partitioned holds 2 leaves",
            "one box per array",
        ),
    ) as info:
        adapters.to_equinox(nn.Dense(3), variables=bad)
    assert isinstance(info.value, adapters.AdapterError)


def test_variable_that_is_not_an_array(getkey):
    variables = nn.Dense(3).init(getkey(), X)
    bad = {"params": {**variables["params"], "bias": "zeros"}}
    with pytest.raises(
        TypeError, match=_msg("params/bias: expected an array, got str ('zeros')")
    ):
        adapters.to_equinox(nn.Dense(3), variables=bad)


# --- ToLinen and adapters.testing paths ------------------------------------------


def test_to_linen_model_that_is_not_equinox():
    with pytest.raises(
        TypeError, match=_msg("`adapters.ToLinen(model=...)` expects an Equinox module")
    ) as info:
        adapters.ToLinen(model=nn.Dense(3)).init(jax.random.key(0), X)
    assert isinstance(info.value, adapters.AdapterError)


def test_factory_whose_state_is_not_a_state(getkey):
    linear = eqx.nn.Linear(4, 3, key=getkey())
    module = adapters.ToLinen(make=lambda key: (linear, {"mean": jnp.zeros(3)}))
    with pytest.raises(
        TypeError, match=_msg("whose state is a dict, not an `eqx.nn.State`")
    ):
        module.init(getkey(), X[0])


def test_vmap_axis_without_positional_inputs(getkey):
    linear = eqx.nn.Linear(4, 3, key=getkey())

    class Keyword(eqx.Module):
        linear: eqx.nn.Linear

        def __call__(self, *, x):
            return self.linear(x)

    module, variables = adapters.to_linen(Keyword(linear), vmap_axis=0)
    with pytest.raises(
        adapters.AdapterError,
        match=_msg("maps the model over the batch axis of its positional inputs"),
    ):
        module.apply(variables, x=X)


def test_assert_equivalent_without_float_output(getkey):
    class Argmax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.argmax(nn.Dense(3)(x), axis=-1)

    model, state = adapters.to_equinox(Argmax(), X, key=getkey())
    with pytest.raises(
        TypeError,
        match=_msg(
            "[adapters.testing] the output has no floating-point array", "`loss=`"
        ),
    ):
        adapters.testing.assert_equivalent(
            Argmax(), model.linen_variables(state), model, state, X
        )
