"""Three reliability fixes, each checked against native Flax / Equinox:

1. `adapters.testing.assert_equivalent` compares complex leaves as complex numbers
   and integer / bool leaves exactly (it used to cast every leaf to float64,
   which dropped imaginary parts and let large integers pass within `rtol`).
2. A rebuilt but identical linen module holding a list (`nn.Sequential`, a list
   field) no longer retraces an `eqx.filter_jit` function; different modules
   (a different list, `2` vs `2.0`, different arrays) are never taken for equal.
3. `adapters.to_native(nn.Embed)` keeps `eqx.nn.Embedding`, which clamps
   out-of-range indices where linen returns NaN rows: documented and pinned here.
"""

import warnings

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import adapters
from adapters.testing import assert_equivalent, PREFIX


FAILED = PREFIX + "assert_equivalent failed: "


# --------------------------------------------------------------------------------
# 1. assert_equivalent: complex, integer and bool leaves


class Phase(nn.Module):
    """A complex output: `x * (1 + 1j * s)` with a trainable real `s`."""

    @nn.compact
    def __call__(self, x):
        s = self.param("s", nn.initializers.normal(1.0), (x.shape[-1],))
        return x * (1 + 1j * s)


class PhasePort(eqx.Module):
    s: jax.Array
    imag_sign: float = eqx.field(static=True, default=1.0)  # -1: a broken port
    imag_nan: bool = eqx.field(static=True, default=False)  # NaN imaginary parts

    def __call__(self, x, *, key=None):
        out = x * (1 + self.imag_sign * 1j * self.s)
        if self.imag_nan:
            out = jax.lax.complex(jnp.real(out), jnp.full(out.shape, jnp.nan))
        return out


def _phase_as_linen(model, state):
    return {"params": {"s": model.s}}


def _phase(getkey):
    x = jr.normal(getkey(), (4, 3))
    variables = Phase().init(getkey(), x)
    return x, variables


@pytest.mark.parametrize("jit", [True, False])
def test_complex_output_equal_passes(getkey, jit):
    x, variables = _phase(getkey)
    port = PhasePort(variables["params"]["s"])
    native = Phase().apply(variables, x)
    assert jnp.iscomplexobj(native)
    chex.assert_trees_all_close(port(x), native)  # the port is right, natively
    assert_equivalent(
        Phase(), variables, port, None, x, as_linen=_phase_as_linen, jit=jit
    )


@pytest.mark.parametrize("jit", [True, False])
def test_complex_output_differing_only_in_imaginary_part_fails(getkey, jit):
    x, variables = _phase(getkey)
    port = PhasePort(variables["params"]["s"], imag_sign=-1.0)
    native, broken = Phase().apply(variables, x), port(x)
    # Natively: the real parts are equal, the imaginary parts are not.
    chex.assert_trees_all_equal(jnp.real(broken), jnp.real(native))
    expected = float(jnp.max(jnp.abs(broken - native)))
    assert expected > 0.1
    # Warnings ignored, as outside a test suite: a cast to float would pass.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AssertionError) as info:
            assert_equivalent(
                Phase(), variables, port, None, x, as_linen=_phase_as_linen, jit=jit
            )
    message = str(info.value)
    assert message.startswith(FAILED + "output differs (train mode, step 0)"), message
    assert "at 'output'" in message
    assert "moduli of complex differences" in message
    reported = float(message.split("max abs error ")[1].split(",")[0])
    np.testing.assert_allclose(reported, expected, rtol=1e-2)


def test_complex_nan_in_imaginary_part_only_is_reported(getkey):
    x, variables = _phase(getkey)
    port = PhasePort(variables["params"]["s"], imag_nan=True)
    assert not np.isnan(np.asarray(Phase().apply(variables, x))).any()
    with pytest.raises(AssertionError, match="NaN on the Equinox side only") as info:
        assert_equivalent(
            Phase(),
            variables,
            port,
            None,
            x,
            as_linen=_phase_as_linen,
            loss=lambda out: jnp.sum(jnp.real(out) ** 2),
            jit=False,
        )
    assert str(info.value).startswith(FAILED + "output differs"), str(info.value)
    assert f"at {x.size} of {x.size} positions" in str(info.value)


class Counted(nn.Module):
    """A float output next to an integer and a bool output."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(2)(x)
        big = jnp.full((3,), 10_000_000, jnp.int32)
        return {"y": y, "count": big, "positive": y > 0}


class CountedPort(eqx.Module):
    kernel: jax.Array
    bias: jax.Array
    off_by: int = eqx.field(static=True, default=0)  # a broken integer output
    flip: bool = eqx.field(static=True, default=False)  # a broken bool output

    def __call__(self, x, *, key=None):
        y = x @ self.kernel + self.bias
        big = jnp.full((3,), 10_000_000, jnp.int32).at[1].add(self.off_by)
        positive = (y <= 0) if self.flip else (y > 0)
        return {"y": y, "count": big, "positive": positive}


def _counted_as_linen(model, state):
    return {"params": {"Dense_0": {"kernel": model.kernel, "bias": model.bias}}}


def test_integer_and_bool_outputs_equal_pass(getkey):
    x = jr.normal(getkey(), (4, 3))
    variables = Counted().init(getkey(), x)
    port = CountedPort(**variables["params"]["Dense_0"])
    chex.assert_trees_all_close(port(x), Counted().apply(variables, x))
    assert_equivalent(
        Counted(), variables, port, None, x, as_linen=_counted_as_linen, jit=False
    )


def test_integer_output_is_compared_exactly(getkey):
    """10_000_001 vs 10_000_000 is within `rtol=1e-5`: a float comparison passes
    it, an exact one does not."""
    x = jr.normal(getkey(), (4, 3))
    variables = Counted().init(getkey(), x)
    port = CountedPort(**variables["params"]["Dense_0"], off_by=1)
    native = Counted().apply(variables, x)["count"]
    assert np.allclose(port(x)["count"], native, rtol=1e-5, atol=1e-6)
    assert int(port(x)["count"][1]) != int(native[1])
    with pytest.raises(AssertionError) as info:
        assert_equivalent(
            Counted(), variables, port, None, x, as_linen=_counted_as_linen, jit=False
        )
    message = str(info.value)
    assert message.startswith(FAILED + "output differs"), message
    assert "at 'output/count'" in message
    assert (
        "1 of 3 values differ: max abs error 1, max rel error 1e-07 (int32 values "
        "are compared exactly, rtol and atol do not apply; the first at index (1,): "
        "linen 10000000, Equinox 10000001)."
    ) in message


def test_bool_output_is_compared_exactly(getkey):
    x = jr.normal(getkey(), (4, 3))
    variables = Counted().init(getkey(), x)
    port = CountedPort(**variables["params"]["Dense_0"], flip=True)
    with pytest.raises(AssertionError) as info:
        assert_equivalent(
            Counted(), variables, port, None, x, as_linen=_counted_as_linen, jit=False
        )
    message = str(info.value)
    assert "at 'output/positive'" in message
    n = x.shape[0] * 2
    assert f"{n} of {n} values differ (bool values are compared exactly" in message


# --------------------------------------------------------------------------------
# 2. Static: value-based equality of linen modules


def _traced_call():
    """An `eqx.filter_jit` function calling a wrapped model, and its trace count."""
    traces = []

    @eqx.filter_jit
    def call(model, x, state):
        traces.append(None)
        return model(x, state)

    return call, traces


def _sequential(features=3):
    return nn.Sequential([nn.Dense(features), nn.relu, nn.Dense(2)])


def test_rebuilt_sequential_does_not_retrace(getkey):
    x = jr.normal(getkey(), (5, 4))
    variables = _sequential().init(getkey(), x)
    native = _sequential().apply(variables, x)
    call, traces = _traced_call()
    for _ in range(20):  # a fresh nn.Sequential and a fresh wrapper every time
        model, state = adapters.to_equinox(_sequential(), variables=variables)
        out, state = call(model, x, state)
        chex.assert_trees_all_close(out, native)
    assert len(traces) == 1

    # A different list: a new trace, and the new module's own result.
    other = _sequential(4)
    other_variables = other.init(getkey(), x)
    model, state = adapters.to_equinox(other, variables=other_variables)
    out, _ = call(model, x, state)
    assert len(traces) == 2
    chex.assert_trees_all_close(out, other.apply(other_variables, x))


def test_rebuilt_sequential_from_example_inputs_under_assert_max_traces(getkey):
    """The brief's form: `to_equinox(seq, x, key=k)` rebuilt, one jitted function
    decorated with `eqx.debug.assert_max_traces(max_traces=1)`."""
    x = jr.normal(getkey(), (5, 4))
    key = getkey()

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def call(model, x, state):
        return model(x, state)

    for _ in range(20):
        seq = _sequential()
        model, state = adapters.to_equinox(seq, x, key=key)
        out, _ = call(model, x, state)
        # The variables the wrapper made are linen's own init with these keys.
        native_vars = seq.init(adapters.linen_rngs(key, ("params", "dropout")), x)
        chex.assert_trees_all_close(out, seq.apply(native_vars, x))


class ListMLP(nn.Module):
    features: list

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width)(x)
            if i < len(self.features) - 1:
                x = jnp.tanh(x)
        return x


def test_module_with_list_field_does_not_retrace(getkey):
    x = jr.normal(getkey(), (5, 4))
    variables = ListMLP([6, 2]).init(getkey(), x)
    native = ListMLP([6, 2]).apply(variables, x)
    call, traces = _traced_call()
    for _ in range(20):
        model, state = adapters.to_equinox(ListMLP([6, 2]), variables=variables)
        out, _ = call(model, x, state)
        chex.assert_trees_all_close(out, native)
    assert len(traces) == 1

    other_variables = ListMLP([7, 2]).init(getkey(), x)
    model, state = adapters.to_equinox(ListMLP([7, 2]), variables=other_variables)
    out, _ = call(model, x, state)
    assert len(traces) == 2
    chex.assert_trees_all_close(out, ListMLP([7, 2]).apply(other_variables, x))


class DictWidths(nn.Module):
    """A dict field holding a list (linen keeps it as a FrozenDict)."""

    config: dict

    @nn.compact
    def __call__(self, x):
        for width in self.config["widths"]:
            x = nn.Dense(width)(x)
        return x


def test_module_with_dict_of_lists_field_does_not_retrace(getkey):
    x = jr.normal(getkey(), (5, 4))
    variables = DictWidths({"widths": [3, 2]}).init(getkey(), x)
    call, traces = _traced_call()
    for _ in range(5):
        module = DictWidths({"widths": [3, 2]})
        model, state = adapters.to_equinox(module, variables=variables)
        out, _ = call(model, x, state)
        chex.assert_trees_all_close(out, module.apply(variables, x))
    assert len(traces) == 1
    module = DictWidths({"widths": [3, 3]})
    other_variables = module.init(getkey(), x)
    model, state = adapters.to_equinox(module, variables=other_variables)
    out, _ = call(model, x, state)
    assert len(traces) == 2
    chex.assert_trees_all_close(out, module.apply(other_variables, x))


class Scale(nn.Module):
    factor: object

    def __call__(self, x):
        return x * jnp.asarray(self.factor)


@pytest.mark.parametrize(
    "first, second",
    [
        (2, 2.0),  # equal and hashed alike by Python, not the same computation
        (0.0, -0.0),  # equal by `==`; the sign of a zero product differs
        ([2, 3], [2.0, 3.0]),  # the same inside a list
    ],
    ids=["int-float", "signed-zero", "list-int-float"],
)
def test_equal_by_python_but_different_modules_are_not_confused(first, second):
    x = jnp.array([-1, 2, 3], jnp.int32)
    call, traces = _traced_call()
    for factor in (first, second):
        factor_x = x if not isinstance(factor, list) else x[:2]
        model, state = adapters.to_equinox(Scale(factor), variables={})
        out, _ = call(model, factor_x, state)
        native = Scale(factor).apply({}, factor_x)
        assert out.dtype == native.dtype
        chex.assert_trees_all_equal(np.signbit(out), np.signbit(native))
        chex.assert_trees_all_equal(out, native)
    assert len(traces) == 2


@pytest.mark.parametrize(
    "make",
    [lambda v: np.full((3,), v, np.float32), lambda v: {"a": np.full((3,), v)}],
    ids=["numpy-array", "dict-of-arrays"],
)
def test_modules_holding_arrays_are_never_taken_for_equal(make):
    """Values that cannot be hashed by value fall back to identity: a different
    array is a new trace with its own result, never the cached one."""

    class Holder(nn.Module):
        held: object

        def __call__(self, x):
            held = self.held["a"] if hasattr(self.held, "keys") else self.held
            return x * held

    x = jnp.arange(3.0)
    call, traces = _traced_call()
    for v in (1.0, 2.0, 3.0):  # linen holds a dict field as a FrozenDict
        module = Holder(make(v))
        model, state = adapters.to_equinox(module, variables={})
        out, _ = call(model, x, state)
        chex.assert_trees_all_close(out, module.apply({}, x))
    assert len(traces) == 3

    # The very same module object: compared by identity, no new trace.
    out, _ = call(model, x, state)
    assert len(traces) == 3


def test_nnx_rewrap_does_not_retrace(getkey):
    """`Static` also holds NNX graph definitions: identical wrappings share a
    trace, and give NNX's own output."""
    from flax import nnx

    module = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(4, 2, rngs=nnx.Rngs(1))
    )
    x = jr.normal(getkey(), (5, 3))
    native = module(x)
    call, traces = _traced_call()
    for _ in range(3):
        model, state = adapters.to_equinox(module)
        out, _ = call(model, x, state)
        chex.assert_trees_all_close(out, native)
    assert len(traces) == 1


# --------------------------------------------------------------------------------
# 3. to_native(nn.Embed): out-of-range indices


def _embed(getkey, num=5, features=3):
    module = nn.Embed(num, features)
    variables = module.init(getkey(), jnp.zeros((1,), jnp.int32))
    layer, state = adapters.to_native(module, variables)
    return module, variables, layer, state


@pytest.mark.parametrize("jit", [True, False])
def test_embed_in_range_indices_equal_linen(getkey, jit):
    module, variables, layer, state = _embed(getkey)
    assert type(layer) is eqx.nn.Embedding and state is None
    ids = jnp.array([[0, 1, 4], [-1, -5, 2]])  # negative in-range ids wrap in both
    lookup = jax.vmap(jax.vmap(layer))
    if jit:
        lookup = jax.jit(lookup)
    chex.assert_trees_all_equal(lookup(ids), module.apply(variables, ids))


@pytest.mark.parametrize("jit", [True, False])
def test_embed_out_of_range_indices_documented_difference(getkey, jit):
    """Linen returns NaN rows (`jnp.take(..., mode="fill")`); eqx.nn.Embedding
    (`weight[i]`) clamps to the nearest row. docs/differences.md says so."""
    module, variables, layer, _ = _embed(getkey)
    table = variables["params"]["embedding"]
    ids = jnp.array([5, 7, 100, -6, -100])
    apply = jax.jit(module.apply) if jit else module.apply
    lookup = jax.jit(jax.vmap(layer)) if jit else jax.vmap(layer)
    linen = apply(variables, ids)
    assert np.isnan(np.asarray(linen)).all()
    converted = lookup(ids)
    expected = jnp.stack([table[4], table[4], table[4], table[0], table[0]])
    chex.assert_trees_all_equal(converted, expected)


def test_embed_difference_is_documented():
    doc = adapters.to_native.__doc__
    assert doc is not None and "out-of-range" in doc and "NaN" in doc
