"""Native migration: converted layers compute what the linen layers compute, and
convert back bit-exactly."""

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
