"""`adapters.testing.assert_equivalent` with a Flax NNX reference: passes on
equivalent models (`adapters.to_equinox` wrappers and hand-written Equinox ports),
and each check fails, with a message naming the check, mode, step, NNX path and
errors, on a deliberately broken port. Expected values are computed with native NNX,
Equinox and optax, never copied from the implementation."""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from flax import nnx

import adapters
from adapters.testing import assert_equivalent


FAILED = "[adapters.testing] assert_equivalent failed: "


# --------------------------------------------------------------------------------
# NNX models


class Net(nnx.Module):
    """Linear + BatchNorm + relu + Dropout + Linear. The first Linear has no bias:
    a BatchNorm right after it would cancel the bias, whose gradient would then be
    rounding noise that Adam turns into full-size updates."""

    def __init__(self, rngs, momentum=0.99):
        self.linear = nnx.Linear(3, 6, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(6, momentum=momentum, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        x = self.drop(jax.nn.relu(self.norm(self.linear(x))))
        return self.head(x)


class Counter(nnx.Variable):
    """A variable type of our own: state, not trainable."""


class Tracked(nnx.Module):
    """A Linear whose output is halved on the first call, counted by a custom
    non-trainable variable, plus a running mean of its output."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.calls = Counter(jnp.zeros((), jnp.int32))
        self.ema = Counter(jnp.zeros(2))

    def __call__(self, x):
        y = self.linear(x)
        self.calls[...] += 1
        self.ema[...] = 0.9 * self.ema[...] + 0.1 * y.mean(0)
        return y * jnp.where(self.calls[...] > 1, 1.0, 0.5) + self.ema[...]


class LinBN(nnx.Module):
    """Linear + BatchNorm (+ Dropout), for the hand-written Equinox port below."""

    def __init__(self, rngs, dropout=False):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs) if dropout else None

    def __call__(self, x):
        x = self.norm(self.linear(x))
        return x if self.drop is None else self.drop(x)


def _x(key, shape=(8, 3)):
    return jr.normal(key, shape)


def _module(cls=Net, **kwargs):
    return cls(nnx.Rngs(params=0, dropout=1), **kwargs)


def _snapshot(module):
    """The module's whole state as numpy arrays (PRNG keys by their key data)."""

    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(leaf, nnx.to_pure_dict(nnx.state(module)))


def _clone(state):
    """A State of our own (an eager call consumes the State it is given)."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def _errors(message):
    """The max abs and rel errors a failure message reports."""
    match = re.search(r"max abs error (\S+), max rel error (\S+) \(", message)
    assert match, message
    return float(match[1]), float(match[2])


def _fails(check):
    """`pytest.raises` for a failed `check` ("output", "state", ...)."""
    verb = "differ" if check == "parameters" else "differs"
    return pytest.raises(AssertionError, match=re.escape(f"{FAILED}{check} {verb}"))


def _check(info, *pieces):
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f"{piece!r} not in {message!r}"
    return message


def _loss(out):
    """`assert_equivalent`'s default loss, for a single float32 output."""
    return jnp.mean(jnp.square(out))


# --------------------------------------------------------------------------------
# A hand-written Equinox port of `LinBN`: `eqx.nn.Linear` (weight stored `(out,
# in)`, NNX's kernel is `(in, out)`) and a BatchNorm of our own. Equinox's
# `eqx.nn.BatchNorm` keeps other running statistics than NNX's: mode="batch"
# debiases them by a step counter (and starts the variance at 0), mode="ema"
# normalises with the running averages in training; NNX's start at (0, 1), move by
# `momentum` and normalise with the batch's own statistics.


class NNXStyleBatchNorm(eqx.Module):
    scale: jax.Array
    bias: jax.Array
    index: eqx.nn.StateIndex
    momentum: float = eqx.field(static=True)
    inference: bool = False

    def __call__(self, x, state):  # x: (batch, features)
        mean, var = state.get(self.index)
        if not self.inference:
            # NNX's fast variance: E[x^2] - E[x]^2.
            batch_mean = x.mean(0)
            batch_var = jnp.maximum(0.0, jnp.mean(x * x, 0) - batch_mean**2)
            m = self.momentum
            state = state.set(
                self.index,
                (m * mean + (1 - m) * batch_mean, m * var + (1 - m) * batch_var),
            )
            mean, var = batch_mean, batch_var
        return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * self.scale) + self.bias, state


class Port(eqx.Module):
    linear: eqx.nn.Linear
    norm: NNXStyleBatchNorm
    dropout: bool = eqx.field(static=True, default=False)
    frozen: bool = eqx.field(static=True, default=False)  # a broken port

    def __call__(self, x, state, *, key=None):
        linear = self.linear
        if self.frozen:
            linear = eqx.tree_at(
                lambda lin: lin.weight, linear, jax.lax.stop_gradient(linear.weight)
            )
        x, state = self.norm(jax.vmap(linear)(x), state)
        if self.dropout and not self.norm.inference:
            keep = jax.random.bernoulli(_dropout_key(key), 0.5, x.shape)
            x = jnp.where(keep, x / 0.5, 0.0)
        return x, state


def _dropout_key(key):
    """The key of the first mask that an `nnx.Dropout` (one stream, named
    "dropout") draws after `adapters.nnx_reseed(module, key)`: `nnx.reseed` gives
    the stream `nnx.Rngs(dropout=k).dropout()`, `k` the key `adapters.linen_rngs`
    derives for "dropout", and the stream folds in its count, 0."""
    k = adapters.linen_rngs(key, ("dropout",))["dropout"]
    return jax.random.fold_in(nnx.Rngs(dropout=k).dropout(), 0)


def _port(module, frozen=False):
    v = nnx.to_pure_dict(nnx.state(module))
    linear = eqx.nn.Linear(3, 4, key=jr.key(0))
    linear = eqx.tree_at(
        lambda lin: (lin.weight, lin.bias),
        linear,
        (v["linear"]["kernel"].T, v["linear"]["bias"]),
    )
    stats = (v["norm"]["mean"], v["norm"]["var"])
    norm = NNXStyleBatchNorm(
        v["norm"]["scale"], v["norm"]["bias"], eqx.nn.StateIndex(stats), 0.9
    )
    return eqx.nn.make_with_state(Port)(
        linear, norm, dropout=module.drop is not None, frozen=frozen
    )


def _port_as_nnx(model, state):
    """The port's arrays in NNX's layout (used for gradients too)."""
    mean, var = state.get(model.norm.index)
    return {
        "linear": {"kernel": model.linear.weight.T, "bias": model.linear.bias},
        "norm": {
            "scale": model.norm.scale,
            "bias": model.norm.bias,
            "mean": mean,
            "var": var,
        },
    }


# --------------------------------------------------------------------------------
# 1. Equivalent models pass


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_to_equinox_of_batchnorm_dropout_mlp_without_key(getkey, jit):
    module = _module()
    model, state = adapters.to_equinox(module)
    # Without `key` the module's own streams draw the dropout masks, and advance in
    # the state on both sides (compared by the state check).
    assert_equivalent(
        module,
        None,
        model,
        state,
        _x(getkey()),
        optimizer=optax.adam(1e-2),
        steps=3,
        jit=jit,
    )


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_to_equinox_of_batchnorm_dropout_mlp_with_key(getkey, jit):
    # Needs `NNXToEquinox.__call__(..., key=)`: the call reseeded by
    # `adapters.nnx_reseed`, its RNG streams left unchanged in the state.
    module = _module()
    model, state = adapters.to_equinox(module)
    assert_equivalent(
        module,
        None,
        model,
        state,
        _x(getkey()),
        key=getkey(),
        optimizer=optax.adam(1e-2),
        steps=3,
        jit=jit,
    )


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_to_equinox_with_custom_counter_variable(getkey, jit):
    module = Tracked(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    assert_equivalent(
        module,
        None,
        model,
        state,
        _x(getkey()),
        optimizer=optax.adam(1e-2),
        steps=3,
        jit=jit,
    )


class Scale(nnx.Variable):
    """A variable type of our own, trained when the filter says so."""


class Scaled(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.scale = Scale(jnp.full((2,), 2.0))

    def __call__(self, x):
        return self.linear(x) * self.scale[...]


def test_uses_the_candidates_trainable_filter(getkey):
    module = Scaled(nnx.Rngs(0))
    model, state = adapters.to_equinox(module, trainable=(nnx.Param, Scale))
    assert "scale" in model.variables
    # The reference trains `scale` too (the candidate's filter), so the optimiser
    # moves it on both sides.
    assert_equivalent(
        module, None, model, state, _x(getkey()), optimizer=optax.adam(1e-2)
    )
    # With `nnx.Param` alone the reference keeps `scale` as state, while the
    # candidate trains it.
    with _fails("state") as info:
        assert_equivalent(
            module,
            None,
            model,
            state,
            _x(getkey()),
            trainable=nnx.Param,
            optimizer=optax.adam(1e-2),
        )
    _check(info, "at NNX path 'scale' (Equinox path model.variables['scale'])")


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_hand_written_port_through_as_nnx(getkey, jit):
    module = LinBN(nnx.Rngs(0))
    model, state = _port(module)
    x = _x(getkey())
    # The port really is a port: NNX's arrays, transposed, and NNX's output.
    assert model.linear.weight.shape == (4, 3) != module.linear.kernel.shape
    native = nnx.clone(module)
    np.testing.assert_allclose(
        model(x, _clone(state))[0], native(x), rtol=1e-5, atol=1e-6
    )
    assert_equivalent(
        module,
        None,
        model,
        state,
        x,
        as_nnx=_port_as_nnx,
        # SGD: the Linear's bias before the BatchNorm has a gradient of rounding
        # noise, different in each implementation, which Adam would amplify.
        optimizer=optax.sgd(0.1),
        steps=3,
        jit=jit,
    )


def test_passes_on_hand_written_port_with_dropout_and_key(getkey):
    module = LinBN(nnx.Rngs(params=0, dropout=1), dropout=True)
    model, state = _port(module)
    x, key = _x(getkey()), getkey()
    # Natively, the NNX module reseeded with the step's key draws the port's mask.
    step_key = jax.random.fold_in(key, 0)
    native = nnx.clone(module)
    adapters.nnx_reseed(native, step_key)
    np.testing.assert_allclose(
        model(x, _clone(state), key=step_key)[0], native(x), rtol=1e-5, atol=1e-6
    )
    # With `key`, the port need not hold NNX's RNG streams: they are not compared.
    assert "drop" not in _port_as_nnx(model, state)
    assert_equivalent(
        module,
        None,
        model,
        state,
        x,
        key=key,
        as_nnx=_port_as_nnx,
        optimizer=optax.sgd(0.1),
        steps=3,
    )


class Sows(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        y = self.linear(x)
        self.sow(nnx.Intermediate, "y", y)
        return jnp.tanh(y)


# NNX 0.12 deprecates `sow` outside `nnx.capture`, the one way a module comes to hold
# sown values (which both sides then leave out of the state).
@pytest.mark.filterwarnings(
    "ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning"
)
def test_sown_values_are_not_state(getkey):
    module = Sows(nnx.Rngs(0))
    x = _x(getkey())
    module(x)  # natively, the module now holds a sown value
    before = _snapshot(module)
    model, state = adapters.to_equinox(module)
    assert_equivalent(module, None, model, state, x, optimizer=optax.adam(1e-2))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, _snapshot(module)))


# --------------------------------------------------------------------------------
# 2. The user's module is never changed


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("keyed", [False, True])
def test_reference_module_is_not_mutated(getkey, jit, keyed):
    module = _module()
    before = _snapshot(module)
    variables = [v for _, v in nnx.to_flat_state(nnx.state(module))]
    # A failing comparison (another model: its output differs at step 0) ...
    model, state = _port(LinBN(nnx.Rngs(0)))
    with _fails("output"):
        assert_equivalent(
            module,
            None,
            model,
            state,
            _x(getkey()),
            key=getkey() if keyed else None,
            as_nnx=_port_as_nnx,
            optimizer=optax.adam(1e-2),
            jit=jit,
        )
    # ... and a passing one.
    wrapped, wrapped_state = adapters.to_equinox(module)
    assert_equivalent(
        module,
        None,
        wrapped,
        wrapped_state,
        _x(getkey()),
        key=getkey() if keyed else None,
        optimizer=optax.adam(1e-2),
        steps=3,
        jit=jit,
    )
    after = _snapshot(module)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # The very Variable objects, still in the module.
    after_variables = [v for _, v in nnx.to_flat_state(nnx.state(module))]
    assert all(a is b for a, b in zip(variables, after_variables, strict=True))


# --------------------------------------------------------------------------------
# 3. Each check fails on a broken port


def test_batchnorm_momentum_fails_state_by_nnx_path(getkey):
    reference = _module(momentum=0.99)
    broken = _module(momentum=0.5)
    nnx.update(broken, nnx.state(reference, nnx.Param))  # the very same params
    model, state = adapters.to_equinox(broken)
    x = _x(getkey())
    with _fails("state") as info:
        assert_equivalent(reference, None, model, state, x)
    message = _check(
        info,
        "(train mode, step 0)",
        "at NNX path 'norm/mean'",
        "(Equinox path state.get(model.state_index)['norm']['mean'])",
    )
    assert "linen" not in message
    # Natively: the same outputs in training mode (the same dropout masks too) ...
    a, b = nnx.clone(reference), nnx.clone(broken)
    np.testing.assert_array_equal(a(x), b(x))
    # ... and running means that differ by the reported errors.
    want = np.asarray(a.norm.mean[...], np.float64)
    got = np.asarray(b.norm.mean[...], np.float64)
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(np.max(np.abs(got - want)), rel=1e-2)
    assert rel_error == pytest.approx(np.max(np.abs(got - want) / np.abs(want)), 1e-2)


def _drops_update(model, x, state, *, key=None):
    """A broken candidate: the state it returns is the one it was given."""
    kwargs = {} if key is None else {"key": key}
    out, _ = model(x, _clone(state), **kwargs)
    return out, state


@pytest.mark.parametrize("jit", [True, False])
def test_dropped_state_update_fails_state_with_custom_variable(getkey, jit):
    module = Tracked(nnx.Rngs(0))
    model, state = adapters.to_equinox(module)
    with _fails("state") as info:
        assert_equivalent(
            module, None, model, state, _x(getkey()), call=_drops_update, jit=jit
        )
    message = _check(
        info,
        "(train mode, step 0)",
        "at NNX path 'calls' (Equinox path state.get(model.state_index)['calls'])",
        "int32 values are compared exactly",
    )
    # Natively, one call counts 1, from 0.
    native = nnx.clone(module)
    native(_x(getkey()))
    count = int(native.calls[...])
    assert f"the first: NNX {count}, Equinox 0" in message
    assert f"max abs error {count}, max rel error 1" in message


@pytest.mark.parametrize(
    "keyed, path",
    [
        # Without `key`, the module's own RNG stream advances, and is compared.
        (False, "drop/rngs/count"),
        # With `key`, the streams are not compared: the next leaf is.
        (True, "norm/mean"),
    ],
)
def test_dropped_state_update_fails_state_rng_streams_only_without_key(
    getkey, keyed, path
):
    module = _module()
    model, state = adapters.to_equinox(module)
    with _fails("state") as info:
        assert_equivalent(
            module,
            None,
            model,
            state,
            _x(getkey()),
            key=getkey() if keyed else None,
            call=_drops_update,
        )
    _check(info, "(train mode, step 0)", f"at NNX path {path!r}")
    assert nnx.to_pure_dict(nnx.state(module, nnx.RngState))["drop"]["rngs"]


def test_stop_gradient_fails_gradient_naming_the_transposed_weight(getkey):
    module = LinBN(nnx.Rngs(0))
    model, state = _port(module, frozen=True)
    x = _x(getkey())
    # Natively the broken port computes NNX's output.
    np.testing.assert_allclose(
        model(x, _clone(state))[0], nnx.clone(module)(x), rtol=1e-5, atol=1e-6
    )
    with _fails("gradient") as info:
        assert_equivalent(module, None, model, state, x, as_nnx=_port_as_nnx)
    message = _check(
        info,
        "(train mode, step 0)",
        "at NNX path 'linear/kernel' (computed by `as_nnx` from grads.linear.weight)",
    )
    # The port's gradient of that weight is zero, NNX's is not.
    grads = nnx.grad(lambda m: _loss(m(x)))(nnx.clone(module))
    want = float(jnp.max(jnp.abs(grads["linear"]["kernel"][...])))
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(want, rel=1e-2)
    assert rel_error == pytest.approx(1.0)


class Lin(eqx.Module):
    """A port of `nnx.Linear` in NNX's own layout."""

    kernel: jax.Array
    bias: jax.Array

    def __call__(self, x, *, key=None):
        return x @ self.kernel + self.bias.astype(x.dtype)


def test_float16_param_fails_parameters_after_optimiser_update(getkey):
    module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    kernel, bias = module.kernel[...], module.bias[...]
    # The bias is stored in float16 (exactly: it is zero) and cast in `as_nnx`, so
    # outputs and the gradients of `sum` (the batch size) agree exactly ...
    port = Lin(kernel, bias.astype(jnp.float16))

    def as_nnx(m, s):
        return {"kernel": m.kernel, "bias": m.bias.astype(jnp.float32)}

    x = _x(getkey())
    with _fails("parameters") as info:
        assert_equivalent(
            module,
            None,
            port,
            None,
            x,
            as_nnx=as_nnx,
            loss=jnp.sum,
            optimizer=optax.adam(1e-2),
        )
    message = _check(
        info,
        "(train mode, step 0, after the optimiser update)",
        "at NNX path 'bias'",
    )

    # ... but Adam's float16 update is not its float32 one: native optax.
    def updated(dtype):
        b = bias.astype(dtype)
        grad = jnp.full(b.shape, x.shape[0], dtype)
        opt = optax.adam(1e-2)
        updates, _ = opt.update(grad, opt.init(b), b)
        return np.asarray(optax.apply_updates(b, updates), np.float64)

    want, got = updated(jnp.float32), updated(jnp.float16)
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(np.max(np.abs(got - want)), rel=1e-2)
    assert rel_error == pytest.approx(np.max(np.abs(got - want) / np.abs(want)), 1e-2)


def test_wrong_param_fails_output_in_inference_mode_alone(getkey):
    reference = _module()
    broken = _module()
    broken.head.bias[...] = broken.head.bias[...] + 0.5
    model, state = adapters.to_equinox(broken)
    x = _x(getkey())
    with _fails("output") as info:
        assert_equivalent(reference, None, model, state, x, modes=["inference"])
    message = _check(info, "(inference mode, step 0)", "at 'output'")
    # The last layer is linear: every output is off by the bias's 0.5.
    assert _errors(message)[0] == pytest.approx(0.5, rel=1e-3)


# --------------------------------------------------------------------------------
# 4. Argument errors


def test_type_error_for_variables_with_nnx_module(getkey):
    module = _module()
    model, state = adapters.to_equinox(module)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(module, nnx.state(module), model, state, _x(getkey()))
    _check(info, "NNX module", "variables=None")


def test_type_error_for_linen_module_without_variables(getkey):
    x = _x(getkey())
    model, state = adapters.to_equinox(nn.Dense(2), x, key=getkey())
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(nn.Dense(2), None, model, state, x)
    _check(info, "linen module", "variables")


def test_type_error_for_as_linen_with_nnx_reference(getkey):
    module = LinBN(nnx.Rngs(0))
    model, state = _port(module)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(
            module, None, model, state, _x(getkey()), as_linen=_port_as_nnx
        )
    _check(info, "`as_linen=`", "as_nnx=")


def test_type_error_for_as_nnx_with_linen_reference(getkey):
    x = _x(getkey())
    model, state = adapters.to_equinox(nn.Dense(2), x, key=getkey())
    variables = model.linen_variables(state)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(
            nn.Dense(2), variables, model, state, x, as_nnx=lambda m, s: {}
        )
    _check(info, "`as_nnx=`", "as_linen=")


def test_type_error_without_as_nnx_for_native_port(getkey):
    module = LinBN(nnx.Rngs(0))
    model, state = _port(module)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(module, None, model, state, _x(getkey()))
    _check(info, "as_nnx=", "nnx.to_pure_dict(nnx.state(module))")


@pytest.mark.parametrize(
    "option",
    [
        {"train_kwarg": "train"},
        {"deterministic_kwarg": "deterministic"},
        {"rng_streams": ("dropout", "noise")},
    ],
)
def test_type_error_for_linen_options_with_nnx_reference(getkey, option):
    module = _module()
    model, state = adapters.to_equinox(module)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(module, None, model, state, _x(getkey()), **option)
    _check(info, f"`{next(iter(option))}`", "NNX module")


def test_type_error_for_collection_names_as_nnx_trainable(getkey):
    module = _module()
    model, state = adapters.to_equinox(module)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(
            module, None, model, state, _x(getkey()), trainable=("batch_stats",)
        )
    _check(info, "NNX filter", "'batch_stats'")


def test_type_error_for_another_kind_of_reference(getkey):
    port, state = _port(LinBN(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(port, None, port, state, _x(getkey()))
    _check(info, "flax.linen.Module", "flax.nnx.Module", "Port")
