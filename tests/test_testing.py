"""`adapters.testing.assert_equivalent`: passes on equivalent models, and each of its
checks fails, with a message naming the check, mode, step, paths and errors, on a
deliberately broken model. Expected magnitudes are computed with native linen,
Equinox and optax, never copied from the implementation."""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import adapters
from adapters.testing import assert_equivalent


FAILED = "[adapters.testing] assert_equivalent failed: "


# --------------------------------------------------------------------------------
# Models


class Net(nn.Module):
    """Dense + BatchNorm + Dropout + Dense, switched by `train`."""

    momentum: float = 0.9
    ignore_train: bool = False  # a broken port: always in training mode

    @nn.compact
    def __call__(self, x, train: bool):
        train = True if self.ignore_train else train
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(2)(x)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(5)(x))
        return nn.Dense(2)(x)


class MLPPort(eqx.Module):
    """A hand-written Equinox port of `MLP`: `eqx.nn.Linear`s holding the
    transposed Dense kernels."""

    layers: tuple[eqx.nn.Linear, eqx.nn.Linear]
    frozen_first: bool = eqx.field(static=True, default=False)  # a broken port

    def __call__(self, x, *, key=None):
        first, last = self.layers
        if self.frozen_first:
            first = eqx.tree_at(
                lambda lin: lin.weight, first, jax.lax.stop_gradient(first.weight)
            )
        return jax.vmap(last)(jnp.tanh(jax.vmap(first)(x)))


def _port(params, frozen_first=False, bias_dtype=None):
    layers = []
    for name in ("Dense_0", "Dense_1"):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        if bias_dtype is not None and name == "Dense_1":
            bias = bias.astype(bias_dtype)
        linear = eqx.nn.Linear(*kernel.shape, key=jr.key(0))
        linear = eqx.tree_at(
            lambda lin: (lin.weight, lin.bias), linear, (kernel.T, bias)
        )
        layers.append(linear)
    return MLPPort(tuple(layers), frozen_first)


def _port_as_linen(model, state):
    return {
        "params": {
            f"Dense_{i}": {"kernel": layer.weight.T, "bias": layer.bias}
            for i, layer in enumerate(model.layers)
        }
    }


class EqxBN(eqx.Module):
    """A native, per-example Equinox model: Linear + BatchNorm over axis "batch"."""

    linear: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")

    def __call__(self, x, state, *, key=None):
        return self.bn(self.linear(x), state)


def _vmapped(m, x, s, *, key=None):
    mapped = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return mapped(x, s)


def _to_linen_layout(m, s):
    return adapters.to_linen(m, s)[1]


class Lin(eqx.Module):
    """An Equinox port of `nn.Dense` in linen's own layout."""

    kernel: jax.Array
    bias: jax.Array

    def __call__(self, x, *, key=None):
        return x @ self.kernel + self.bias.astype(x.dtype)


def _lin_as_linen(model, state):
    return {"params": {"kernel": model.kernel, "bias": model.bias}}


def _x(key, shape=(6, 3)):
    return jr.normal(key, shape)


def _net(getkey):
    x = _x(getkey())
    model, state = adapters.to_equinox(Net(), x, key=getkey(), train_kwarg="train")
    return x, model, state, model.linen_variables(state)


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


def _linen_step0(module, variables, x, key, **kwargs):
    """Linen's own training-mode apply, with the keys `assert_equivalent`
    documents for step 0."""
    rngs = adapters.linen_rngs(jax.random.fold_in(key, 0), ("dropout",))
    return module.apply(
        variables, x, rngs=rngs, mutable=["batch_stats"], train=True, **kwargs
    )


# --------------------------------------------------------------------------------
# 1. Equivalent models pass


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_to_equinox_wrapper(getkey, jit):
    x, model, state, variables = _net(getkey)
    assert_equivalent(
        Net(),
        variables,
        model,
        state,
        x,
        key=getkey(),
        train_kwarg="train",
        optimizer=optax.adam(1e-2),
        steps=3,
        jit=jit,
    )


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_native_equinox_model_against_to_linen(getkey, jit):
    model, state = eqx.nn.make_with_state(EqxBN)(getkey())
    linen_module, variables = adapters.to_linen(
        model, state, vmap_axis=0, axis_name="batch"
    )
    assert_equivalent(
        linen_module,
        variables,
        model,
        state,
        _x(getkey()),
        as_linen=_to_linen_layout,
        call=_vmapped,
        deterministic_kwarg="inference",
        optimizer=optax.adam(1e-2),
        steps=3,
        jit=jit,
    )


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_hand_written_port_with_transposed_kernels(getkey, jit):
    x = _x(getkey())
    variables = MLP().init(getkey(), x)
    port = _port(variables["params"])
    # The port really is a port: its arrays are not linen's, but transposed.
    kernel = variables["params"]["Dense_0"]["kernel"]
    assert port.layers[0].weight.shape == kernel.T.shape != kernel.shape
    np.testing.assert_allclose(port(x), MLP().apply(variables, x), rtol=1e-5)
    assert_equivalent(
        MLP(),
        variables,
        port,
        None,
        x,
        as_linen=_port_as_linen,
        optimizer=optax.adam(1e-2),  # elementwise: commutes with the transposition
        steps=3,
        jit=jit,
    )


@pytest.mark.parametrize("jit", [True, False])
def test_passes_on_stateless_model_with_state_none(getkey, jit):
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    linen_module, variables = adapters.to_linen(mlp, vmap_axis=0)
    assert set(variables) == {"params"}

    def call(m, x, state, *, key=None):
        assert state is None
        return jax.vmap(m)(x), None

    assert_equivalent(
        linen_module,
        variables,
        mlp,
        None,
        _x(getkey()),
        as_linen=_to_linen_layout,
        call=call,
        optimizer=optax.sgd(0.1),
        jit=jit,
    )


# --------------------------------------------------------------------------------
# 2. Each check fails on a broken model


@pytest.mark.parametrize("jit", [True, False])
def test_wrong_bias_fails_output(getkey, jit):
    x, _, _, variables = _net(getkey)
    wrong = jax.tree.map(lambda a: a, variables)
    wrong["params"]["Dense_1"]["bias"] = variables["params"]["Dense_1"]["bias"] + 0.5
    model, state = adapters.to_equinox(Net(), variables=wrong, train_kwarg="train")
    key = getkey()
    with _fails("output") as info:
        assert_equivalent(
            Net(), variables, model, state, x, key=key, train_kwarg="train", jit=jit
        )
    message = _check(info, "(train mode, step 0)", "at 'output'", "rtol=1e-05")
    # Native: the last layer is linear, so every output is off by the bias's 0.5.
    native, _ = _linen_step0(Net(), variables, x, key)
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(0.5, rel=1e-3)
    assert rel_error == pytest.approx(float(np.max(0.5 / np.abs(native))), rel=1e-2)


def test_wrong_bias_fails_inference_mode_alone(getkey):
    x, _, _, variables = _net(getkey)
    wrong = jax.tree.map(lambda a: a, variables)
    wrong["params"]["Dense_1"]["bias"] = variables["params"]["Dense_1"]["bias"] + 0.5
    model, state = adapters.to_equinox(Net(), variables=wrong, train_kwarg="train")
    with _fails("output") as info:
        assert_equivalent(
            Net(), variables, model, state, x, train_kwarg="train", modes=["inference"]
        )
    message = _check(info, "(inference mode, step 0)")
    assert _errors(message)[0] == pytest.approx(0.5, rel=1e-3)


def test_batchnorm_momentum_fails_state_not_output(getkey):
    x, _, _, variables = _net(getkey)
    model, state = adapters.to_equinox(
        Net(momentum=0.5), variables=variables, train_kwarg="train"
    )
    key = getkey()
    with _fails("state") as info:
        assert_equivalent(
            Net(), variables, model, state, x, key=key, train_kwarg="train"
        )
    message = _check(
        info,
        "(train mode, step 0)",
        "at linen path 'batch_stats/BatchNorm_0/mean'",
        "(Equinox path state.get(model.state_indices['batch_stats'])"
        "['BatchNorm_0']['mean'])",
    )
    # Natively, linen's two BatchNorms give the same output in training mode...
    out_a, new_a = _linen_step0(Net(), variables, x, key)
    out_b, new_b = _linen_step0(Net(momentum=0.5), variables, x, key)
    np.testing.assert_array_equal(out_a, out_b)
    # ... and running means that differ by the reported errors.
    want = np.asarray(new_a["batch_stats"]["BatchNorm_0"]["mean"], np.float64)
    got = np.asarray(new_b["batch_stats"]["BatchNorm_0"]["mean"], np.float64)
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(np.max(np.abs(got - want)), rel=1e-2)
    relative = np.abs(got - want) / np.abs(want)
    assert rel_error == pytest.approx(np.max(relative), rel=1e-2)


def test_dropped_state_update_fails_state(getkey):
    model, state = eqx.nn.make_with_state(EqxBN)(getkey())
    linen_module, variables = adapters.to_linen(
        model, state, vmap_axis=0, axis_name="batch"
    )
    x = _x(getkey())

    def drops_update(m, x, s, *, key=None):
        out, _ = _vmapped(m, x, s)
        return out, s  # the input state, unchanged

    with _fails("state") as info:
        assert_equivalent(
            linen_module,
            variables,
            model,
            state,
            x,
            as_linen=_to_linen_layout,
            call=drops_update,
            deterministic_kwarg="inference",
            jit=False,
        )
    message = _check(
        info,
        "(train mode, step 0)",
        "at linen path 'batch_stats/bn/batch_counter'",
        "(Equinox path state.get(model.bn.batch_counter))",
    )
    # Natively, one training call moves the counter from its initial value.
    _, new_state = _vmapped(model, x, state)
    before = state.get(model.bn.batch_counter)
    after = new_state.get(model.bn.batch_counter)
    assert _errors(message) == pytest.approx(
        (abs(float(after - before)), abs(float(after - before) / float(after)))
    )


def test_stop_gradient_fails_gradient_only(getkey):
    x = _x(getkey())
    variables = MLP().init(getkey(), x)
    port = _port(variables["params"], frozen_first=True)
    # Natively the broken port computes linen's output.
    np.testing.assert_allclose(port(x), MLP().apply(variables, x), rtol=1e-5, atol=1e-6)
    with _fails("gradient") as info:
        assert_equivalent(MLP(), variables, port, None, x, as_linen=_port_as_linen)
    message = _check(
        info, "(train mode, step 0)", "at linen path 'params/Dense_0/kernel'"
    )
    # The Equinox side's gradient of that weight is zero, linen's is not.
    grads = jax.grad(lambda p: jnp.mean(MLP().apply({"params": p}, x) ** 2))(
        variables["params"]
    )
    abs_error, rel_error = _errors(message)
    want = float(jnp.max(jnp.abs(grads["Dense_0"]["kernel"])))
    assert abs_error == pytest.approx(want, rel=1e-2)
    assert rel_error == pytest.approx(1.0)


def test_gradient_failure_names_equinox_path_of_transposed_weight(getkey):
    x = _x(getkey())
    variables = MLP().init(getkey(), x)
    port = _port(variables["params"], frozen_first=True)
    with pytest.raises(AssertionError) as info:
        assert_equivalent(MLP(), variables, port, None, x, as_linen=_port_as_linen)
    _check(info, "layers[0].weight")


def test_float16_param_fails_parameters_after_optimiser_update(getkey):
    x = _x(getkey())
    variables = nn.Dense(2).init(getkey(), x)
    params = variables["params"]
    # The bias is stored in float16 (exactly: it is zero) and cast in `as_linen`, so
    # outputs and the gradients of `sum` (the batch size) agree exactly...
    model = Lin(params["kernel"], params["bias"].astype(jnp.float16))

    def as_linen(m, s):
        return {"params": {"kernel": m.kernel, "bias": m.bias.astype(jnp.float32)}}

    with _fails("parameters") as info:
        assert_equivalent(
            nn.Dense(2),
            variables,
            model,
            None,
            x,
            as_linen=as_linen,
            loss=jnp.sum,
            optimizer=optax.adam(1e-2),
        )
    message = _check(
        info,
        "(train mode, step 0, after the optimiser update)",
        "at linen path 'params/bias'",
    )

    # ... but Adam's float16 update is not its float32 one: native optax.
    def updated(dtype):
        bias = params["bias"].astype(dtype)
        grad = jnp.full(bias.shape, x.shape[0], dtype)
        opt = optax.adam(1e-2)
        updates, _ = opt.update(grad, opt.init(bias), bias)
        return np.asarray(optax.apply_updates(bias, updates), np.float64)

    want, got = updated(jnp.float32), updated(jnp.float16)
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(np.max(np.abs(got - want)), rel=1e-2)
    relative = np.abs(got - want) / np.abs(want)
    assert rel_error == pytest.approx(np.max(relative), rel=1e-2)


class Warmup(nn.Module):
    """Dense, halved until the `count` of calls reaches `warmup`."""

    warmup: int = 2

    @nn.compact
    def __call__(self, x):
        count = self.variable("counters", "count", lambda: jnp.zeros((), jnp.int32))
        y = nn.Dense(2)(x) * jnp.where(count.value >= self.warmup, 1.0, 0.5)
        if not self.is_initializing():
            count.value += 1
        return y


class WarmupPort(eqx.Module):
    """A port of `Warmup` with an off-by-one (`>` for `>=`): wrong from call 2."""

    kernel: jax.Array
    bias: jax.Array
    count: eqx.nn.StateIndex
    warmup: int = eqx.field(static=True, default=2)

    def __call__(self, x, state, *, key=None):
        count = state.get(self.count)
        y = (x @ self.kernel + self.bias) * jnp.where(count > self.warmup, 1.0, 0.5)
        return y, state.set(self.count, count + 1)


def test_defect_after_some_steps_names_the_step(getkey):
    x = _x(getkey())
    variables = Warmup().init(getkey(), x)
    p = variables["params"]["Dense_0"]
    model, state = eqx.nn.make_with_state(WarmupPort)(
        p["kernel"], p["bias"], eqx.nn.StateIndex(variables["counters"]["count"])
    )

    def as_linen(m, s):
        return {
            "params": {"Dense_0": {"kernel": m.kernel, "bias": m.bias}},
            "counters": {"count": s.get(m.count)},
        }

    # Two steps pass; the third shows the defect.
    assert_equivalent(Warmup(), variables, model, state, x, as_linen=as_linen, steps=2)
    with _fails("output") as info:
        assert_equivalent(
            Warmup(), variables, model, state, x, as_linen=as_linen, steps=3
        )
    message = _check(info, "(train mode, step 2)")
    native = nn.Dense(2).apply({"params": p}, x)  # after warm-up: unscaled
    abs_error, rel_error = _errors(message)
    assert abs_error == pytest.approx(float(jnp.max(jnp.abs(0.5 * native))), rel=1e-2)
    assert rel_error == pytest.approx(0.5, rel=1e-3)


class Scaled(nn.Module):
    """Dense times a frozen float buffer in a non-trainable collection."""

    @nn.compact
    def __call__(self, x):
        scale = self.variable("consts", "scale", jnp.full, (2,), 2.0, jnp.float32)
        return nn.Dense(2)(x) * scale.value


class ScaledPort(eqx.Module):
    """A port that forgot to freeze the buffer: the optimiser trains it."""

    dense: Lin
    scale: jax.Array

    def __call__(self, x, *, key=None):
        return self.dense(x) * self.scale


def test_trained_frozen_buffer_fails_state_with_equinox_model_path(getkey):
    x = _x(getkey())
    variables = Scaled().init(getkey(), x)
    p = variables["params"]["Dense_0"]
    port = ScaledPort(Lin(p["kernel"], p["bias"]), variables["consts"]["scale"])

    def as_linen(m, s):
        return {
            "params": {"Dense_0": {"kernel": m.dense.kernel, "bias": m.dense.bias}},
            "consts": {"scale": m.scale},
        }

    # Without an optimiser nothing differs.
    assert_equivalent(Scaled(), variables, port, None, x, as_linen=as_linen, jit=False)
    opt = optax.adam(1e-2)
    with _fails("state") as info:
        assert_equivalent(
            Scaled(), variables, port, None, x, as_linen=as_linen, optimizer=opt
        )
    message = _check(
        info,
        "(train mode, step 0)",
        "at linen path 'consts/scale' (Equinox path model.scale)",
    )
    # Native: the buffer moved by one Adam update of its gradient.
    grads = eqx.filter_grad(lambda m: jnp.mean(m(x) ** 2))(port)
    params = eqx.filter(port, eqx.is_inexact_array)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert _errors(message)[0] == pytest.approx(
        float(jnp.max(jnp.abs(updates.scale))), rel=1e-2
    )


def test_missing_collection_fails_in_structure(getkey):
    x, model, state, variables = _net(getkey)
    with _fails("state") as info:
        assert_equivalent(
            Net(),
            variables,
            model,
            state,
            x,
            key=getkey(),
            train_kwarg="train",
            as_linen=lambda m, s: {"params": m.variables["params"]},
            jit=False,
        )
    _check(
        info,
        "(train mode, step 0) in structure",
        "linen paths missing on the Equinox side",
        "'batch_stats/BatchNorm_0/mean'",
        "'batch_stats/BatchNorm_0/var'",
    )


def test_float16_leaf_fails_on_dtype(getkey):
    x = _x(getkey())
    variables = MLP().init(getkey(), x)
    # Dense's bias starts at zero, so float16 holds it exactly and the output is
    # linen's; the gradient, though, is float16 on the Equinox side.
    port = _port(variables["params"], bias_dtype=jnp.float16)
    np.testing.assert_allclose(port(x), MLP().apply(variables, x), rtol=1e-5)
    with _fails("gradient") as info:
        assert_equivalent(
            MLP(), variables, port, None, x, as_linen=_port_as_linen, jit=False
        )
    _check(
        info,
        "(train mode, step 0)",
        "at linen path 'params/Dense_1/bias' (Equinox path grads.layers[1].bias)",
        "linen float32[2], Equinox float16[2]",
    )


def test_model_ignoring_inference_mode_fails_in_inference_mode(getkey):
    x, _, _, variables = _net(getkey)
    model, state = adapters.to_equinox(
        Net(ignore_train=True), variables=variables, train_kwarg="train"
    )
    key = getkey()
    kwargs = dict(key=key, train_kwarg="train", jit=False)
    # Training mode alone passes: the defect is only in inference mode.
    assert_equivalent(Net(), variables, model, state, x, modes=["train"], **kwargs)
    with _fails("output") as info:
        assert_equivalent(Net(), variables, model, state, x, **kwargs)
    message = _check(info, "(inference mode, step 0)")
    # Native linen, inference mode: running averages and no dropout, against the
    # broken module's batch statistics and dropout (same keys).
    rngs = adapters.linen_rngs(jax.random.fold_in(key, 0), ("dropout",))
    want = Net().apply(variables, x, train=False)
    got, _ = Net(ignore_train=True).apply(
        variables, x, train=False, rngs=rngs, mutable=["batch_stats"]
    )
    error = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert _errors(message)[0] == pytest.approx(np.max(error), rel=1e-2)


# --------------------------------------------------------------------------------
# 3. Retracing


def _retracing_call(m, x, state, *, key=None):
    """Returns a state whose structure differs from the one it was given (`None`
    at first, then an array): the jitted step must be traced again."""
    return m(x), jnp.zeros(())


def test_retrace_across_steps_fails_with_jit(getkey):
    x = _x(getkey())
    variables = nn.Dense(2).init(getkey(), x)
    model = Lin(**variables["params"])
    kwargs = dict(as_linen=_lin_as_linen, call=_retracing_call)
    # Without jit there is nothing to retrace, and the models agree.
    assert_equivalent(nn.Dense(2), variables, model, None, x, jit=False, **kwargs)
    # With jit, today: Equinox's own `eqx.debug.assert_max_traces` RuntimeError,
    # naming the argument responsible ("state"), not an `AssertionError`.
    with pytest.raises(
        (AssertionError, RuntimeError), match=r"traced 2 times|retrac"
    ) as info:
        assert_equivalent(nn.Dense(2), variables, model, None, x, jit=True, **kwargs)
    assert "state" in str(info.value)


class WeakScale(nn.Module):
    """Dense times a trainable scalar that its initialiser makes weakly typed."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", lambda key: jnp.asarray(2.0))
        return nn.Dense(2)(x) * scale


def test_weakly_typed_param_is_not_a_retrace(getkey):
    x = _x(getkey())
    native = WeakScale().init(getkey(), x)
    assert native["params"]["scale"].weak_type  # linen's init: weakly typed
    model, state = adapters.to_equinox(WeakScale(), x, variables=native)
    # The wrapper keeps it weakly typed, as linen does (see docs/decisions.md);
    # `assert_equivalent` starts both sides strong, so its step does not retrace.
    assert model.variables["params"]["scale"].weak_type
    assert_equivalent(
        WeakScale(),
        native,
        model,
        state,
        x,
        optimizer=optax.adam(1e-2),
    )


def test_retrace_failure_is_a_prefixed_assertion_error(getkey):
    x = _x(getkey())
    variables = nn.Dense(2).init(getkey(), x)
    model = Lin(**variables["params"])
    with pytest.raises(AssertionError, match=re.escape(FAILED)) as info:
        assert_equivalent(
            nn.Dense(2),
            variables,
            model,
            None,
            x,
            as_linen=_lin_as_linen,
            call=_retracing_call,
        )
    _check(info, "step 1")


# --------------------------------------------------------------------------------
# 4. Tolerances


def test_tolerances_are_arguments(getkey):
    x = _x(getkey())
    variables = nn.Dense(2).init(getkey(), x)
    model = Lin(**variables["params"])

    def call(m, x, state, *, key=None):
        return m(x) * (1 + 1e-4), state

    kwargs = dict(as_linen=_lin_as_linen, call=call, jit=False)
    assert_equivalent(nn.Dense(2), variables, model, None, x, rtol=1e-3, **kwargs)
    with _fails("output") as info:
        assert_equivalent(nn.Dense(2), variables, model, None, x, **kwargs)
    message = _check(info, "(rtol=1e-05, atol=1e-06)")
    assert _errors(message)[1] == pytest.approx(1e-4, rel=1e-2)


@pytest.mark.parametrize("tolerance", [None, 1e-2])
def test_bfloat16_candidate_fails_on_dtype(getkey, tolerance):
    x = _x(getkey())
    variables = nn.Dense(2).init(getkey(), x)
    bf16 = nn.Dense(2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model, state = adapters.to_equinox(
        bf16, variables=jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    )
    tolerances = {} if tolerance is None else dict(rtol=tolerance, atol=tolerance)
    # Loose tolerances (the docstring's advice for bfloat16) do not help: the dtype
    # check comes first.
    with _fails("output") as info:
        assert_equivalent(
            nn.Dense(2), variables, model, state, x, jit=False, **tolerances
        )
    _check(info, "linen float32[6,2], Equinox bfloat16[6,2]")


# --------------------------------------------------------------------------------
# 5. The caller's state stays usable


def test_callers_state_is_not_consumed(getkey):
    x, model, state, variables = _net(getkey)
    assert_equivalent(
        Net(), variables, model, state, x, key=getkey(), train_kwarg="train", jit=False
    )
    key = getkey()
    out, new_state = model(x, state, key=key)
    native_out, updates = Net().apply(
        variables,
        x,
        train=True,
        rngs=adapters.linen_rngs(key, ("dropout",)),
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(out, native_out, rtol=1e-6)
    np.testing.assert_allclose(
        new_state.get(model.state_indices["batch_stats"])["BatchNorm_0"]["mean"],
        updates["batch_stats"]["BatchNorm_0"]["mean"],
        rtol=1e-6,
    )


def test_callers_native_equinox_state_is_not_consumed(getkey):
    model, state = eqx.nn.make_with_state(EqxBN)(getkey())
    linen_module, variables = adapters.to_linen(
        model, state, vmap_axis=0, axis_name="batch"
    )
    x = _x(getkey())

    def eager(m, x, s, *, key=None):
        out, new_s = _vmapped(m, x, s)
        # An eager `State.set` invalidates the State it is called on, here the one
        # `assert_equivalent` passed: it must not be the caller's.
        s.set(m.bn.batch_counter, s.get(m.bn.batch_counter))
        return out, new_s

    assert_equivalent(
        linen_module,
        variables,
        model,
        state,
        x,
        as_linen=_to_linen_layout,
        call=eager,
        deterministic_kwarg="inference",
        jit=False,
    )
    out, _ = _vmapped(model, x, state)  # would raise if `state` had been consumed
    np.testing.assert_allclose(
        out,
        linen_module.apply(variables, x, inference=False, mutable=["batch_stats"])[0],
        rtol=1e-5,
        atol=1e-6,
    )


# --------------------------------------------------------------------------------
# 6. Argument errors


def test_type_error_without_as_linen_for_native_model(getkey):
    x = _x(getkey())
    variables = MLP().init(getkey(), x)
    with pytest.raises(TypeError, match=re.escape("[adapters.testing]")) as info:
        assert_equivalent(MLP(), variables, _port(variables["params"]), None, x)
    _check(info, "as_linen=")


@pytest.mark.parametrize("modes", [["eval"], ("train", "inferencee")])
def test_value_error_for_bad_modes(getkey, modes):
    x, model, state, variables = _net(getkey)
    with pytest.raises(ValueError, match=re.escape("[adapters.testing] `modes`")):
        assert_equivalent(
            Net(), variables, model, state, x, train_kwarg="train", modes=modes
        )


# --------------------------------------------------------------------------------
# Rough edges


def test_nan_on_one_side_is_reported(getkey):
    x = _x(getkey())
    variables = nn.Dense(2).init(getkey(), x)
    model = Lin(**variables["params"])

    def call(m, x, state, *, key=None):
        return m(x).at[0, 0].set(jnp.nan), state

    with _fails("output") as info:
        assert_equivalent(
            nn.Dense(2),
            variables,
            model,
            None,
            x,
            as_linen=_lin_as_linen,
            call=call,
            loss=lambda out: jnp.sum(jnp.nan_to_num(out)),
            jit=False,
        )
    assert "nan" in str(info.value).lower()


def test_missing_key_is_explained(getkey):
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dropout(0.5, deterministic=not train)(nn.Dense(2)(x))

    x = jnp.ones((4, 3))
    model, state = adapters.to_equinox(Drop(), x, key=getkey(), train_kwarg="train")
    with pytest.raises(TypeError, match="pass `key=` to `assert_equivalent`"):
        assert_equivalent(
            Drop(), model.linen_variables(state), model, state, x, train_kwarg="train"
        )
