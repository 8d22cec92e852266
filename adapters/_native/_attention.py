"""Converters for `nn.MultiHeadDotProductAttention` <-> `eqx.nn.MultiheadAttention`."""

import equinox as eqx
import flax.linen as nn

from ._checks import _check_dtype, _refuse_set, params_of, skeleton, unsupported
from ._registry import register_converter


def _attention_to_native(
    module: nn.MultiHeadDotProductAttention, variables: dict, convert
) -> eqx.nn.MultiheadAttention:
    name = "nn.MultiHeadDotProductAttention"
    if module.decode:
        raise unsupported(
            name,
            "decode",
            True,
            "eqx.nn.MultiheadAttention has no decode cache",
        )
    if module.normalize_qk:
        raise unsupported(
            name,
            "normalize_qk",
            True,
            "eqx.nn.MultiheadAttention has no query/key normalisation",
        )
    if module.attention_fn is not nn.dot_product_attention:
        raise unsupported(
            name,
            "attention_fn",
            module.attention_fn,
            "eqx.nn.MultiheadAttention computes dot-product attention",
        )
    if module.dropout_rate and module.broadcast_dropout:
        raise unsupported(
            name,
            "broadcast_dropout",
            True,
            "eqx.nn.MultiheadAttention drops each weight independently",
        )
    _refuse_set(
        module,
        name,
        (
            "precision",
            "qkv_dot_general",
            "out_dot_general",
            "qkv_dot_general_cls",
            "out_dot_general_cls",
            "qk_attn_weights_einsum_cls",
            "attn_weights_value_einsum_cls",
        ),
        "eqx.nn.MultiheadAttention uses plain matmuls and einsums",
    )
    _check_dtype(module, name, "eqx.nn.MultiheadAttention", variables)
    if module.force_fp32_for_softmax:
        raise unsupported(
            name,
            "force_fp32_for_softmax",
            True,
            "with half-precision inputs linen then returns float32, while "
            "eqx.nn.MultiheadAttention returns the input's dtype (it always takes "
            "the softmax in at least float32)",
        )
    expected = [f"{p}/kernel" for p in ("query", "key", "value", "out")]
    if module.use_bias:
        expected += [f"{p}/bias" for p in ("query", "key", "value", "out")]
    p = params_of(variables, name, tuple(expected))
    q, k, v, out = p["query"], p["key"], p["value"], p["out"]
    heads, qk_size = q["kernel"].shape[1:]
    vo_size = v["kernel"].shape[2]
    layer = skeleton(
        eqx.nn.MultiheadAttention,
        heads,
        q["kernel"].shape[0],
        k["kernel"].shape[0],
        v["kernel"].shape[0],
        out["kernel"].shape[2],
        qk_size=qk_size,
        vo_size=vo_size,
        use_query_bias=module.use_bias,
        use_key_bias=module.use_bias,
        use_value_bias=module.use_bias,
        use_output_bias=module.use_bias,
        dropout_p=module.dropout_rate,
        inference=bool(module.deterministic),
        dtype=q["kernel"].dtype,
    )

    def flat(kernel):  # (in, heads, size) -> (heads * size, in)
        return kernel.reshape(kernel.shape[0], -1).T

    weights = [
        flat(q["kernel"]),
        flat(k["kernel"]),
        flat(v["kernel"]),
        out["kernel"].reshape(-1, out["kernel"].shape[-1]).T,
    ]
    projections = lambda m: [  # noqa: E731
        m.query_proj,
        m.key_proj,
        m.value_proj,
        m.output_proj,
    ]
    layer = eqx.tree_at(lambda m: [p.weight for p in projections(m)], layer, weights)
    if module.use_bias:
        biases = [
            q["bias"].reshape(-1),
            k["bias"].reshape(-1),
            v["bias"].reshape(-1),
            out["bias"],
        ]
        layer = eqx.tree_at(lambda m: [p.bias for p in projections(m)], layer, biases)
    return layer


def _attention_from_native(layer: eqx.nn.MultiheadAttention, state, convert):
    biases = (
        layer.use_query_bias,
        layer.use_key_bias,
        layer.use_value_bias,
        layer.use_output_bias,
    )
    if len(set(biases)) != 1:
        raise unsupported(
            "eqx.nn.MultiheadAttention",
            "use_*_bias",
            biases,
            "nn.MultiHeadDotProductAttention has one `use_bias` for all",
        )
    heads = layer.num_heads

    def unflat(weight):  # (heads * size, in) -> (in, heads, size)
        return weight.T.reshape(weight.shape[1], heads, -1)

    params = {
        "query": {"kernel": unflat(layer.query_proj.weight)},
        "key": {"kernel": unflat(layer.key_proj.weight)},
        "value": {"kernel": unflat(layer.value_proj.weight)},
        "out": {
            "kernel": layer.output_proj.weight.T.reshape(heads, -1, layer.output_size)
        },
    }
    if biases[0]:
        for name, proj in (
            ("query", layer.query_proj),
            ("key", layer.key_proj),
            ("value", layer.value_proj),
        ):
            params[name]["bias"] = proj.bias.reshape(heads, -1)
        params["out"]["bias"] = layer.output_proj.bias
    if layer.qk_size != layer.vo_size:
        raise unsupported(
            "eqx.nn.MultiheadAttention",
            "qk_size != vo_size",
            (layer.qk_size, layer.vo_size),
            "linen uses one `qkv_features` for queries, keys and values",
        )
    module = nn.MultiHeadDotProductAttention(
        num_heads=heads,
        qkv_features=heads * layer.qk_size,
        out_features=layer.output_size,
        use_bias=biases[0],
        dropout_rate=layer.dropout.p,
        deterministic=bool(layer.dropout.inference),
        broadcast_dropout=False,
        param_dtype=layer.query_proj.weight.dtype,
    )
    return module, {"params": params}


register_converter(
    nn.MultiHeadDotProductAttention,
    eqx.nn.MultiheadAttention,
    to_native=_attention_to_native,
    from_native=_attention_from_native,
)
