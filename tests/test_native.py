"""Native migration: converted layers compute what the linen layers compute, and
convert back bit-exactly."""

import contextlib
import re

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

import adapters


def _rows(layer, x):
    """Equinox layers are per example: map over the batch axis."""
    return jax.vmap(layer)(x)


def _channels_last(layer, x):
    """linen convolutions are NHWC; Equinox's are per-example channels-first."""
    return jnp.moveaxis(jax.vmap(layer)(jnp.moveaxis(x, -1, 1)), 1, -1)


X = jr.normal(jr.key(1), (4, 3))
X2D = jr.normal(jr.key(2), (2, 9, 9, 4))
X1D = jr.normal(jr.key(3), (2, 9, 4))

CASES = {
    "dense": (nn.Dense(5), X, _rows, eqx.nn.Linear),
    "dense_no_bias": (nn.Dense(5, use_bias=False), X, _rows, eqx.nn.Linear),
    "layernorm": (nn.LayerNorm(), X, _rows, eqx.nn.LayerNorm),
    "layernorm_eps_no_bias": (
        nn.LayerNorm(epsilon=1e-3, use_bias=False),
        X,
        _rows,
        eqx.nn.LayerNorm,
    ),
    "rmsnorm": (nn.RMSNorm(), X, _rows, eqx.nn.RMSNorm),
    "embed": (nn.Embed(10, 3), jnp.array([1, 2, 9, 0]), _rows, eqx.nn.Embedding),
    "conv2d": (nn.Conv(6, (3, 3)), X2D, _channels_last, eqx.nn.Conv),
    "conv2d_strided_valid": (
        nn.Conv(6, (3, 3), strides=2, padding="VALID", use_bias=False),
        X2D,
        _channels_last,
        eqx.nn.Conv,
    ),
    "conv2d_groups_dilation_pads": (
        nn.Conv(
            8,
            (3, 2),
            kernel_dilation=(2, 1),
            feature_group_count=2,
            padding=((1, 2), (0, 1)),
        ),
        X2D,
        _channels_last,
        eqx.nn.Conv,
    ),
    "conv1d": (nn.Conv(6, (3,), padding=1), X1D, _channels_last, eqx.nn.Conv),
    "conv3d": (
        nn.Conv(4, (2, 3, 2), strides=(1, 2, 1)),
        jr.normal(jr.key(4), (2, 4, 6, 5, 3)),
        _channels_last,
        eqx.nn.Conv,
    ),
    "conv_transpose_valid": (
        nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="VALID"),
        X2D,
        _channels_last,
        eqx.nn.ConvTranspose,
    ),
    "conv_transpose_same_dilated": (
        nn.ConvTranspose(5, (3, 3), padding="SAME", kernel_dilation=(2, 2)),
        X2D,
        _channels_last,
        eqx.nn.ConvTranspose,
    ),
    "conv_transpose_1d_no_bias": (
        nn.ConvTranspose(5, (3,), strides=(2,), use_bias=False),
        X1D,
        _channels_last,
        eqx.nn.ConvTranspose,
    ),
    "groupnorm": (nn.GroupNorm(num_groups=2), X2D, _channels_last, eqx.nn.GroupNorm),
    "groupnorm_group_size": (
        nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-3),
        X2D,
        _channels_last,
        eqx.nn.GroupNorm,
    ),
    "sequential": (
        nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)]),
        X,
        _rows,
        eqx.nn.Sequential,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_layer_matches_linen(case, getkey):
    module, x, call, native_type = CASES[case]
    variables = module.init(getkey(), x)
    layer, state = adapters.to_native(module, variables)
    assert type(layer) is native_type and state is None
    chex.assert_trees_all_close(call(layer, x), module.apply(variables, x), atol=1e-5)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        # Gradients w.r.t. the input agree too.
        native_grad = jax.grad(lambda x: jnp.sum(module.apply(variables, x) ** 2))(x)
        grad = jax.grad(lambda x: jnp.sum(call(layer, x) ** 2))(x)
        chex.assert_trees_all_close(grad, native_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(case, getkey):
    module, x, _, _ = CASES[case]
    variables = module.init(getkey(), x)
    back_module, back = adapters.from_native(*adapters.to_native(module, variables))
    chex.assert_trees_all_equal(back, variables)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    # The module that comes back computes what the original computes.
    chex.assert_trees_all_equal(back_module.apply(back, x), module.apply(variables, x))


def test_parameter_gradients_through_the_conversion(getkey):
    """Gradients w.r.t. the converted weights are linen's, in Equinox's layout."""
    module = nn.Dense(5)
    variables = module.init(getkey(), X)
    layer, _ = adapters.to_native(module, variables)
    native = jax.grad(lambda v: jnp.sum(module.apply(v, X) ** 2))(variables)
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(X) ** 2))(layer)
    chex.assert_trees_all_close(grads.weight, native["params"]["kernel"].T, rtol=1e-5)
    chex.assert_trees_all_close(grads.bias, native["params"]["bias"], rtol=1e-5)


def test_dropout_pair(getkey):
    layer, _ = adapters.to_native(nn.Dropout(0.3, deterministic=True), {})
    assert isinstance(layer, eqx.nn.Dropout) and layer.p == 0.3 and layer.inference
    module, variables = adapters.from_native(layer)
    assert module.rate == 0.3 and module.deterministic and variables == {}
    chex.assert_trees_all_equal(layer(X), module.apply({}, X))


def test_unregistered_layer_type(getkey):
    module = nn.Einsum((3, 5), "ab,bc->ac")
    variables = module.init(getkey(), X)
    with pytest.raises(
        adapters.AdapterError, match="(?s)Einsum.*adapters.register_converter"
    ):
        adapters.to_native(module, variables)


def test_option_without_equivalent(getkey):
    module = nn.Dropout(0.5, broadcast_dims=(0,))
    with pytest.raises(adapters.AdapterError, match="broadcast_dims"):
        adapters.to_native(module, {})
    conv = nn.Conv(3, (3, 3), input_dilation=2, padding=1)
    with pytest.raises(adapters.AdapterError, match="input_dilation"):
        adapters.to_native(conv, conv.init(getkey(), X2D))


def test_register_a_users_own_pair(getkey):
    class Scale(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("s", nn.initializers.ones, x.shape[-1:])

    class EqxScale(eqx.Module):
        s: jax.Array

        def __call__(self, x, *, key=None):
            return x * self.s

    adapters.register_converter(
        Scale,
        EqxScale,
        to_native=lambda module, variables, convert: EqxScale(variables["params"]["s"]),
        from_native=lambda layer, state, convert: (
            Scale(),
            {"params": {"s": layer.s}},
        ),
    )
    module = nn.Sequential([Scale(), nn.Dense(2)])  # registered pieces convert whole
    variables = module.init(getkey(), X)
    layer, _ = adapters.to_native(module, variables)
    assert isinstance(layer.layers[0], EqxScale)
    chex.assert_trees_all_close(jax.vmap(layer)(X), module.apply(variables, X))
    _, back = adapters.from_native(layer)
    chex.assert_trees_all_equal(back, variables)


@pytest.mark.parametrize("use_scale, use_bias", [(True, True), (False, False)])
def test_batchnorm_matches_linen_in_training_and_inference(use_scale, use_bias, getkey):
    """`nn.BatchNorm` converts to `adapters.LinenBatchNorm` (eqx.nn.BatchNorm computes
    something else), per example and channels-first, statistics across the vmap."""
    x = jr.normal(getkey(), (8, 5, 5, 3)) * 2 + 1
    train = nn.BatchNorm(
        use_running_average=False, momentum=0.8, use_scale=use_scale, use_bias=use_bias
    )
    variables = train.init(getkey(), x)
    # Non-trivial statistics and affine parameters.
    variables["batch_stats"] = {"mean": jnp.full(3, 0.3), "var": jnp.full(3, 2.0)}
    if use_scale:
        variables["params"] = {
            "scale": jnp.arange(1.0, 4.0),
            "bias": jnp.arange(3.0),
        }
    layer, state = adapters.to_native(train, variables)
    assert isinstance(layer, adapters.LinenBatchNorm)
    batched = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = batched(jnp.moveaxis(x, -1, 1), state)
    native, updates = train.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(jnp.moveaxis(y, 1, -1), native, atol=1e-5, rtol=1e-5)
    mean, var = new_state.get(layer.index)
    chex.assert_trees_all_close(
        {"mean": mean, "var": var}, updates["batch_stats"], rtol=1e-5, atol=1e-6
    )
    # Inference: the running statistics, unchanged.
    infer = nn.BatchNorm(
        use_running_average=True, momentum=0.8, use_scale=use_scale, use_bias=use_bias
    )
    y, same = jax.vmap(
        eqx.nn.inference_mode(layer),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )(jnp.moveaxis(x, -1, 1), state)
    chex.assert_trees_all_close(
        jnp.moveaxis(y, 1, -1), infer.apply(variables, x), atol=1e-5, rtol=1e-5
    )
    # Back, bit-exact.
    module, back = adapters.from_native(layer, state)
    chex.assert_trees_all_equal(back, variables)
    assert module.momentum == 0.8 and module.use_running_average is False


def test_batchnorm_from_native_needs_state(getkey):
    with pytest.raises(adapters.AdapterError, match="needs the `eqx.nn.State`"):
        adapters.from_native(adapters.LinenBatchNorm(3))


def test_gru_cell_matches_linen(getkey):
    """linen: `(carry, x) -> (carry, carry)` on a batch; Equinox: `(x, h) -> h`
    per example, gates (r, z, n) packed into one matrix."""
    cell = nn.GRUCell(4)
    x = jr.normal(getkey(), (5, 3))
    h = jr.normal(getkey(), (5, 4))
    variables = cell.init(getkey(), h, x)
    native, _ = cell.apply(variables, h, x)
    layer, _ = adapters.to_native(cell, variables)
    assert isinstance(layer, eqx.nn.GRUCell)
    chex.assert_trees_all_close(jax.vmap(layer)(x, h), native, atol=1e-6)
    _, back = adapters.from_native(layer)
    chex.assert_trees_all_equal(back, variables)


def test_lstm_cell_matches_linen(getkey):
    """linen's carry is `(c, h)`; Equinox's hidden state is `(h, c)`."""
    cell = nn.LSTMCell(4)
    x = jr.normal(getkey(), (5, 3))
    c, h = jr.normal(getkey(), (5, 4)), jr.normal(getkey(), (5, 4))
    variables = cell.init(getkey(), (c, h), x)
    (native_c, native_h), _ = cell.apply(variables, (c, h), x)
    layer, _ = adapters.to_native(cell, variables)
    assert isinstance(layer, eqx.nn.LSTMCell)
    new_h, new_c = jax.vmap(layer)(x, (h, c))
    chex.assert_trees_all_close((new_c, new_h), (native_c, native_h), atol=1e-6)
    _, back = adapters.from_native(layer)
    chex.assert_trees_all_equal(back, variables)


@pytest.mark.parametrize("use_bias", [True, False])
def test_attention_matches_linen(use_bias, getkey):
    """Heads are packed `(in, heads, size)` in linen and `(heads * size, in)` in
    Equinox; linen takes a batch `(B, L, F)`, Equinox one sequence `(L, F)`."""
    module = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=8, out_features=5, use_bias=use_bias
    )
    q = jr.normal(getkey(), (3, 4, 6))
    kv = jr.normal(getkey(), (3, 7, 6))
    variables = module.init(getkey(), q, kv)
    native = module.apply(variables, q, kv)
    layer, _ = adapters.to_native(module, variables)
    assert isinstance(layer, eqx.nn.MultiheadAttention)
    chex.assert_trees_all_close(jax.vmap(layer)(q, kv, kv), native, atol=1e-5)
    # Gradients w.r.t. the query agree too.
    native_grad = jax.grad(lambda q: jnp.sum(module.apply(variables, q, kv) ** 2))(q)
    grad = jax.grad(lambda q: jnp.sum(jax.vmap(layer)(q, kv, kv) ** 2))(q)
    chex.assert_trees_all_close(grad, native_grad, rtol=1e-4, atol=1e-5)
    back_module, back = adapters.from_native(layer)
    chex.assert_trees_all_equal(back, variables)
    chex.assert_trees_all_equal(back_module.apply(back, q, kv), native)


def test_attention_decode_is_refused(getkey):
    module = nn.MultiHeadDotProductAttention(num_heads=2, decode=True)
    variables = module.init(getkey(), jnp.ones((1, 4, 6)))
    with pytest.raises(adapters.AdapterError, match="decode"):
        adapters.to_native(module, variables)


def test_dense_general_where_expressible(getkey):
    """`nn.DenseGeneral` over the last axis is an `eqx.nn.Linear` (which converts
    back to `nn.Dense`, the same computation); other layouts are refused."""
    module = nn.DenseGeneral(features=5)
    variables = module.init(getkey(), X)
    layer, _ = adapters.to_native(module, variables)
    assert isinstance(layer, eqx.nn.Linear)
    chex.assert_trees_all_close(jax.vmap(layer)(X), module.apply(variables, X))
    back_module, back = adapters.from_native(layer)
    chex.assert_trees_all_equal(back_module.apply(back, X), module.apply(variables, X))
    heads = nn.DenseGeneral(features=(2, 4))
    with pytest.raises(adapters.AdapterError, match="features"):
        adapters.to_native(heads, heads.init(getkey(), X))
    contract = nn.DenseGeneral(features=5, axis=(-2, -1))
    x3 = jr.normal(getkey(), (4, 2, 3))
    with pytest.raises(adapters.AdapterError, match="axis/batch_dims"):
        adapters.to_native(contract, contract.init(getkey(), x3))


def test_conv_transpose_explicit_padding_refused(getkey):
    module = nn.ConvTranspose(3, (3, 3), padding=((1, 1), (1, 1)))
    with pytest.raises(adapters.AdapterError, match="pads the dilated input"):
        adapters.to_native(module, module.init(getkey(), X2D))


def test_small_cnn_converts_whole_and_trains_alike(getkey):
    """A linen CNN built from standard layers converts whole; trained with Adam it
    follows linen's trajectory, BatchNorm statistics included."""
    cnn = nn.Sequential(
        [
            nn.Conv(8, (3, 3), use_bias=False),
            nn.BatchNorm(use_running_average=False, momentum=0.9),
            nn.relu,
            nn.Conv(4, (3, 3), strides=2),
            nn.relu,
        ]
    )
    x = jr.normal(getkey(), (6, 8, 8, 3))
    variables = cnn.init(getkey(), x)
    layer, state = adapters.to_native(cnn, variables)
    assert isinstance(layer, eqx.nn.Sequential)
    assert isinstance(layer.layers[1], adapters.LinenBatchNorm)

    def call(model, x, state, *, key=None):
        out, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(jnp.moveaxis(x, -1, 1), state)
        return jnp.moveaxis(out, 1, -1), state

    adapters.testing.assert_equivalent(
        cnn,
        variables,
        layer,
        state,
        x,
        as_linen=lambda m, s: adapters.from_native(m, s)[1],
        call=call,
        modes=("train",),  # this linen Sequential is fixed in training mode
        optimizer=optax.adam(1e-2),
        steps=3,
        rtol=1e-4,
        atol=1e-5,
    )


def test_register_as_a_class_decorator(getkey):
    class Double(nn.Module):
        def __call__(self, x):
            return 2 * x

    class EqxDouble(eqx.Module):
        def __call__(self, x, *, key=None):
            return 2 * x

    @adapters.register_converter(Double, EqxDouble)
    class DoubleConverter:
        @staticmethod
        def to_native(module, variables, convert):
            return EqxDouble()

        @staticmethod
        def from_native(layer, state, convert):
            return Double(), {}

    module = nn.Sequential([Double(), nn.Dense(2)])
    variables = module.init(getkey(), X)
    layer, _ = adapters.to_native(module, variables)
    assert isinstance(layer.layers[0], EqxDouble)
    chex.assert_trees_all_close(jax.vmap(layer)(X), module.apply(variables, X))
    with pytest.raises(TypeError, match="both"):
        adapters.register_converter(Double, EqxDouble, to_native=lambda *a: None)


# --- the state of a converted stateful layer ----------------------------------------


def _batched(layer):
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def test_state_is_named_like_make_with_state_and_interchangeable(getkey):
    """The state is built as `eqx.nn.make_with_state` builds it: it prints, and two
    conversions of the same layer give interchangeable layers and states."""
    cnn = nn.Sequential(
        [nn.Conv(4, (3, 3)), nn.BatchNorm(use_running_average=False, momentum=0.8)]
    )
    x = jr.normal(getkey(), (4, 6, 6, 3))
    variables = cnn.init(getkey(), x)
    layer1, state1 = adapters.to_native(cnn, variables)
    layer2, state2 = adapters.to_native(cnn, variables)
    assert "layers[1].index" in repr(state1)  # named by its path in the layer
    assert jax.tree.structure(state1) == jax.tree.structure(state2)
    # The layer of one conversion runs with the state of the other.
    y, new_state = _batched(layer1)(jnp.moveaxis(x, -1, 1), state2)
    native, updates = cnn.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(jnp.moveaxis(y, 1, -1), native, atol=1e-5)
    _, back = adapters.from_native(layer2, new_state)
    chex.assert_trees_all_close(
        back["batch_stats"], updates["batch_stats"], atol=1e-6, rtol=1e-6
    )


# --- dtypes ------------------------------------------------------------------------

_CELL_X, _CELL_H = jr.normal(jr.key(5), (5, 3)), jr.normal(jr.key(6), (5, 4))
_Q, _KV = jr.normal(jr.key(7), (3, 4, 6)), jr.normal(jr.key(8), (3, 7, 6))
# Orthogonal initialisation has no bfloat16 kernel on CPU.
_RECURRENT = {"recurrent_kernel_init": nn.initializers.lecun_normal()}


def _batchnorm_rows(layer, x, state):
    y, _ = _batched(layer)(jnp.moveaxis(x, -1, 1), state)
    return jnp.moveaxis(y, 1, -1)


# name: (make(**dtype options), linen inputs, native call(layer, *inputs, state))
DTYPE_CASES = {
    "dense": (lambda **k: nn.Dense(5, **k), (X,), lambda m, x, s: _rows(m, x)),
    "dense_general": (
        lambda **k: nn.DenseGeneral(5, **k),
        (X,),
        lambda m, x, s: _rows(m, x),
    ),
    "layernorm": (lambda **k: nn.LayerNorm(**k), (X,), lambda m, x, s: _rows(m, x)),
    "rmsnorm": (lambda **k: nn.RMSNorm(**k), (X,), lambda m, x, s: _rows(m, x)),
    "groupnorm": (
        lambda **k: nn.GroupNorm(num_groups=2, **k),
        (X2D,),
        lambda m, x, s: _channels_last(m, x),
    ),
    "conv": (
        lambda **k: nn.Conv(6, (3, 3), **k),
        (X2D,),
        lambda m, x, s: _channels_last(m, x),
    ),
    "conv_transpose": (
        lambda **k: nn.ConvTranspose(5, (3, 3), strides=(2, 2), **k),
        (X2D,),
        lambda m, x, s: _channels_last(m, x),
    ),
    "batchnorm": (
        lambda **k: nn.BatchNorm(use_running_average=False, **k),
        (X2D,),
        _batchnorm_rows,
    ),
    "gru": (
        lambda **k: nn.GRUCell(4, **_RECURRENT, **k),
        (_CELL_H, _CELL_X),
        lambda m, h, x, s: jax.vmap(m)(x, h),
    ),
    "lstm": (
        lambda **k: nn.LSTMCell(4, **_RECURRENT, **k),
        ((_CELL_H, _CELL_H), _CELL_X),
        lambda m, carry, x, s: jax.vmap(m)(x, carry[::-1])[::-1],
    ),
    "attention": (
        lambda **k: nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, out_features=5, **k
        ),
        (_Q, _KV),
        lambda m, q, kv, s: jax.vmap(m)(q, kv, kv),
    ),
}


def _linen_out(module, variables, inputs):
    if isinstance(module, nn.BatchNorm):
        return module.apply(variables, *inputs, mutable=["batch_stats"])[0]
    out = module.apply(variables, *inputs)
    if isinstance(module, nn.RNNCellBase):
        return out[0]  # the new carry
    return out


@pytest.mark.parametrize("case", sorted(DTYPE_CASES) + ["embed"])
def test_computation_dtype_is_refused(case, getkey):
    """Linen casts to `dtype=`; an Equinox layer computes in the dtypes of its
    weights and input. A `dtype` other than the weights' dtype does not convert."""
    if case == "embed":
        module = nn.Embed(10, 3, dtype=jnp.bfloat16)  # float32 table
        inputs = (jnp.array([1, 2]),)
    else:
        make, inputs, _ = DTYPE_CASES[case]
        module = make(dtype=jnp.bfloat16)  # float32 weights
    variables = module.init(getkey(), *inputs)
    with pytest.raises(
        adapters.AdapterError,
        match=r"with `dtype=jnp\.bfloat16` has no native equivalent: linen casts.*"
        r"`dtype=None` or the (weights'|table's) dtype.*adapters\.ToEquinox",
    ):
        adapters.to_native(module, variables)


@pytest.mark.parametrize("case", sorted(DTYPE_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_computation_dtype_of_the_weights_converts(case, dtype, getkey):
    """`dtype=` equal to the weights' dtype (a common explicit `dtype=jnp.float32`)
    converts, and computes what linen computes on inputs of that dtype."""
    make, inputs, call = DTYPE_CASES[case]
    module = make(dtype=dtype, param_dtype=dtype)
    inputs = jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a,
        inputs,
    )
    variables = module.init(getkey(), *inputs)
    layer, state = adapters.to_native(module, variables)
    out = call(layer, *inputs, state)
    native = _linen_out(module, variables, inputs)
    chex.assert_trees_all_equal_dtypes(out, native)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    chex.assert_trees_all_close(out, native, atol=tol, rtol=tol)


def test_computation_dtype_is_refused_inside_a_sequential(getkey):
    module = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2, dtype=jnp.bfloat16)])
    variables = module.init(getkey(), X)
    with pytest.raises(
        adapters.AdapterError,
        match=r"nn\.Dense at `layers_2` with `dtype=jnp\.bfloat16` has no native",
    ):
        adapters.to_native(module, variables)


def test_embed_dtype_of_its_own_table_converts(getkey):
    """For a lookup, `dtype=` equal to the table's dtype casts nothing."""
    module = nn.Embed(10, 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    idx = jnp.array([1, 2, 9, 0])
    variables = module.init(getkey(), idx)
    layer, _ = adapters.to_native(module, variables)
    chex.assert_trees_all_equal(jax.vmap(layer)(idx), module.apply(variables, idx))


BF16_CASES = sorted(DTYPE_CASES) + ["embed"]


def _bf16_case(case):
    if case == "embed":
        return (
            nn.Embed(10, 3, param_dtype=jnp.bfloat16),
            (jnp.array([1, 2, 9, 0]),),
            lambda m, x, s: _rows(m, x),
        )
    make, inputs, call = DTYPE_CASES[case]
    return make(param_dtype=jnp.bfloat16), inputs, call


# bfloat16 inputs everywhere; float32 inputs too, except for convolutions, whose
# Equinox layers take inputs of their weights' dtype only (a TypeError otherwise,
# where linen promotes; see docs/native.md).
BF16_PARAMS = [(case, "bfloat16") for case in BF16_CASES] + [
    (case, "float32") for case in BF16_CASES if case not in ("conv", "conv_transpose")
]


@pytest.mark.parametrize("case, input_dtype", BF16_PARAMS)
def test_bfloat16_parameters(case, input_dtype, getkey):
    """`param_dtype=bfloat16`: the Equinox weights are the same bfloat16 arrays, the
    output has linen's dtype and values, and the round trip is bit-exact, back to a
    linen layer whose `init` makes bfloat16 variables again."""
    module, inputs, call = _bf16_case(case)
    inputs = jax.tree.map(
        lambda a: a.astype(input_dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a,
        inputs,
    )
    variables = module.init(getkey(), *inputs)
    assert {a.dtype for a in jax.tree.leaves(variables.get("params"))} == {
        jnp.dtype(jnp.bfloat16)
    }
    layer, state = adapters.to_native(module, variables)
    weights = jax.tree.leaves(eqx.filter(layer, eqx.is_inexact_array))
    assert weights and all(w.dtype == jnp.bfloat16 for w in weights)
    out = call(layer, *inputs, state)
    native = _linen_out(module, variables, inputs)
    chex.assert_trees_all_equal_dtypes(out, native)
    # Tolerance by the output's dtype: float32 outputs agree to float32 rounding.
    half = any(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(native))
    tol = 2e-2 if half else 1e-5
    chex.assert_trees_all_close(out, native, atol=tol, rtol=tol)
    back_module, back = adapters.from_native(layer, state)
    chex.assert_trees_all_equal(back, variables)
    chex.assert_trees_all_equal_dtypes(back, variables)
    # The module that comes back makes variables of these dtypes.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(back_module.init, getkey(), *inputs), variables
    )


def test_half_precision_linen_batchnorm_trains(getkey):
    """Built directly with `dtype=bfloat16`: bfloat16 scale and bias, running
    statistics in float32 as linen keeps them, and a training step that keeps the
    state's dtypes, computing what linen's BatchNorm computes."""
    layer, state = eqx.nn.make_with_state(adapters.LinenBatchNorm)(
        3, momentum=0.9, dtype=jnp.bfloat16
    )
    assert layer.scale.dtype == jnp.bfloat16
    assert {a.dtype for a in state.get(layer.index)} == {jnp.dtype(jnp.float32)}
    x = (jr.normal(getkey(), (8, 5, 5, 3)) * 2 + 1).astype(jnp.bfloat16)
    module = nn.BatchNorm(
        use_running_average=False, momentum=0.9, param_dtype=jnp.bfloat16
    )
    variables = module.init(getkey(), x)
    for _ in range(2):
        y, state = _batched(layer)(jnp.moveaxis(x, -1, 1), state)
        native, updates = module.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        chex.assert_trees_all_equal_dtypes(jnp.moveaxis(y, 1, -1), native)
        chex.assert_trees_all_close(
            jnp.moveaxis(y, 1, -1), native, atol=1e-2, rtol=1e-2
        )
        mean, var = state.get(layer.index)
        assert mean.dtype == var.dtype == jnp.float32
        chex.assert_trees_all_close(
            {"mean": mean, "var": var}, updates["batch_stats"], atol=1e-6, rtol=1e-6
        )


def test_batchnorm_statistics_restored_in_half_precision_keep_their_dtype(getkey):
    module = nn.BatchNorm(use_running_average=False)
    x = jr.normal(getkey(), (8, 3))
    variables = module.init(getkey(), x)
    variables["batch_stats"] = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16), variables["batch_stats"]
    )
    layer, state = adapters.to_native(module, variables)
    _, state = _batched(layer)(x[..., None], state)  # (channels, 1) per example
    assert {a.dtype for a in state.get(layer.index)} == {jnp.dtype(jnp.bfloat16)}


def test_batchnorm_computes_in_linens_dtypes(getkey):
    """Like linen, `LinenBatchNorm` takes batch statistics in at least float32 and
    returns the dtype the input and parameters promote to."""
    x = (jr.normal(getkey(), (8, 5, 5, 3)) * 2 + 1).astype(jnp.bfloat16)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        module = nn.BatchNorm(use_running_average=False, param_dtype=param_dtype)
        variables = module.init(getkey(), x)
        layer, state = adapters.to_native(module, variables)
        y, new_state = _batched(layer)(jnp.moveaxis(x, -1, 1), state)
        native, updates = module.apply(variables, x, mutable=["batch_stats"])
        y = jnp.moveaxis(y, 1, -1)
        assert y.dtype == native.dtype
        tol = 1e-5 if param_dtype == jnp.float32 else 1e-2
        chex.assert_trees_all_close(y, native, atol=tol, rtol=tol)
        mean, var = new_state.get(layer.index)
        chex.assert_trees_all_close(
            {"mean": mean, "var": var}, updates["batch_stats"], atol=1e-6, rtol=1e-6
        )
        infer = nn.BatchNorm(use_running_average=True, param_dtype=param_dtype)
        y, _ = _batched(eqx.nn.inference_mode(layer))(jnp.moveaxis(x, -1, 1), state)
        native = infer.apply(variables, x)
        assert y.dtype == native.dtype
        chex.assert_trees_all_close(jnp.moveaxis(y, 1, -1), native, atol=tol, rtol=tol)


def test_batchnorm_slow_variance_is_reproduced(getkey):
    """`use_fast_variance=False` (variance as `E[|x - E[x]|²]`) carries over. On
    inputs far from zero the two formulas differ well beyond rounding."""
    x = jr.normal(getkey(), (8, 5, 5, 3)) * 3 + 100
    module = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = module.init(getkey(), x)
    layer, state = adapters.to_native(module, variables)
    assert layer.use_fast_variance is False
    y, new_state = _batched(layer)(jnp.moveaxis(x, -1, 1), state)
    native, updates = module.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(jnp.moveaxis(y, 1, -1), native, atol=1e-4)
    mean, var = new_state.get(layer.index)
    chex.assert_trees_all_close(
        {"mean": mean, "var": var}, updates["batch_stats"], rtol=1e-5
    )
    back_module, back = adapters.from_native(layer, state)
    assert back_module.use_fast_variance is False
    chex.assert_trees_all_equal(back, variables)


def test_batchnorm_without_batch_stats(getkey):
    module = nn.BatchNorm(use_running_average=True)
    variables = module.init(getkey(), X2D)
    with pytest.raises(
        adapters.AdapterError,
        match=r"(?s)nn\.BatchNorm.*got collections \['params'\].*"
        r"batch_stats/mean: missing.*batch_stats/var: missing.*pass it with `params`",
    ):
        adapters.to_native(module, {"params": variables["params"]})


@pytest.mark.parametrize(
    "module, option",
    [
        (nn.LayerNorm(force_float32_reductions=False), "force_float32_reductions"),
        (nn.RMSNorm(force_float32_reductions=False), "force_float32_reductions"),
        (
            nn.BatchNorm(use_running_average=True, force_float32_reductions=False),
            "force_float32_reductions",
        ),
        (
            nn.MultiHeadDotProductAttention(num_heads=2, force_fp32_for_softmax=True),
            "force_fp32_for_softmax",
        ),
        (
            nn.MultiHeadDotProductAttention(
                num_heads=2, precision=jax.lax.Precision.HIGHEST
            ),
            "precision",
        ),
        (
            nn.Dense(3, promote_dtype=lambda *a, **k: a),
            "promote_dtype",
        ),
        (
            nn.ConvTranspose(3, (3,), preferred_element_type=jnp.float32),
            "preferred_element_type",
        ),
    ],
)
def test_dtype_and_precision_options_are_refused(module, option, getkey):
    x = X2D if isinstance(module, nn.BatchNorm) else X1D
    variables = module.init(getkey(), x)
    with pytest.raises(
        adapters.AdapterError, match=rf"`{option}=.*has no native equivalent"
    ):
        adapters.to_native(module, variables)


# --- error messages -------------------------------------------------------------------


@contextlib.contextmanager
def _raises_type_error(match):
    """A wrong type raises the package's TypeError subclass of AdapterError."""
    with pytest.raises(TypeError, match=match) as info:
        yield info
    assert isinstance(info.value, adapters.AdapterError)


def test_unregistered_equinox_type_lists_equinox_types():
    with pytest.raises(
        adapters.AdapterError, match="for Equinox layer type .*Identity"
    ) as info:
        adapters.from_native(eqx.nn.Identity())
    registered = str(info.value).split("Registered Equinox\ntypes: ")[1]
    names = registered.rstrip(".").split(", ")
    assert {"Linear", "LinenBatchNorm", "MultiheadAttention"} <= set(names)
    assert not {"Dense", "BatchNorm", "MultiHeadDotProductAttention"} & set(names)


def test_wrong_direction_names_the_type_and_the_other_function(getkey):
    with _raises_type_error(
        r"converts linen layers .*; got equinox\.nn\.\S*Linear\. That is an "
        r"Equinox layer: `adapters\.from_native\(layer, state\)`",
    ):
        adapters.to_native(eqx.nn.Linear(4, 3, key=getkey()), {})
    with _raises_type_error(r"got builtins\.dict\. Pass an unbound linen"):
        adapters.to_native({}, {})
    with _raises_type_error(
        r"converts Equinox layers .*; got flax\.linen\.\S*Dense\. That is a "
        r"linen layer: `adapters\.to_native\(module, variables\)`",
    ):
        adapters.from_native(nn.Dense(3))


def test_unknown_collection_names_the_sublayer_and_the_fix(getkey):
    module = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    variables = module.init(getkey(), X)
    _, sown = module.apply(variables, X, mutable=True, capture_intermediates=True)
    with pytest.raises(
        adapters.AdapterError,
        match=r"nn\.Dense at `layers_0` has variables in \['intermediates'\].*"
        r"`\{'params': variables\['params'\]\}`.*adapters\.register_converter",
    ):
        adapters.to_native(module, {**variables, **sown})


def test_missing_or_unexpected_parameters(getkey):
    variables = nn.Dense(3).init(getkey(), X)
    with pytest.raises(
        adapters.AdapterError,
        match=r"(?s)nn\.Dense do not match.*params/bias: unexpected.*`use_bias`",
    ):
        adapters.to_native(nn.Dense(3, use_bias=False), variables)
    with pytest.raises(
        adapters.AdapterError, match=r"(?s)nn\.Conv do not match.*params/bias: missing"
    ):
        adapters.to_native(
            nn.Conv(3, (3, 3)),
            nn.Conv(3, (3, 3), use_bias=False).init(getkey(), X2D),
        )


def test_sequential_entry_not_callable(getkey):
    variables = {"params": {"layers_0": nn.Dense(3).init(getkey(), X)["params"]}}
    with _raises_type_error(
        r"layer 1 is not callable: 'relu'\. Each layer must be a linen "
        r"module or a function such as `nn\.relu`",
    ):
        adapters.to_native(nn.Sequential([nn.Dense(3), "relu"]), variables)


@pytest.mark.parametrize("case", ["layernorm", "rmsnorm", "groupnorm"])
def test_no_size_names_the_equivalent_layer(case, getkey):
    """The error shows the Equinox layer to build instead; built with the input's
    size, it computes what the linen layer computes."""
    module, x, call, build = {
        "layernorm": (
            nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-3),
            X,
            _rows,
            "eqx.nn.LayerNorm(features, eps=0.001, use_weight=False, use_bias=False)",
        ),
        "rmsnorm": (
            nn.RMSNorm(use_scale=False, epsilon=1e-3),
            X,
            _rows,
            "eqx.nn.RMSNorm(features, eps=0.001, use_weight=False, use_bias=False)",
        ),
        "groupnorm": (
            nn.GroupNorm(num_groups=2, use_scale=False, use_bias=False, epsilon=1e-3),
            X2D,
            _channels_last,
            "eqx.nn.GroupNorm(2, channels, eps=0.001, channelwise_affine=False)",
        ),
    }[case]
    with pytest.raises(
        adapters.AdapterError,
        match=r"carries no (feature size|channel count).*Build the Equinox layer "
        rf"yourself, `{re.escape(build)}`.*adapters\.ToEquinox",
    ):
        adapters.to_native(module, {})
    size = x.shape[-1]
    layer = eval(build.replace("features", str(size)).replace("channels", str(size)))
    chex.assert_trees_all_close(call(layer, x), module.apply({}, x), atol=1e-5)


def test_refusal_in_from_native_names_the_path_and_the_fix(getkey):
    layer = eqx.nn.Sequential(
        [
            eqx.nn.Linear(2, 3, key=getkey()),
            eqx.nn.Conv2d(3, 3, 3, padding_mode="REFLECT", key=getkey()),
        ]
    )
    with pytest.raises(
        adapters.AdapterError,
        match=r"eqx\.nn\.Conv at `\.layers\[1\]` with `padding_mode='REFLECT'` has "
        r"no linen equivalent.*adapters\.ToLinen",
    ):
        adapters.from_native(layer)
