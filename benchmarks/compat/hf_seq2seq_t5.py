"""transformers rows: T5-like encoder-decoders (t5, mt5, longt5) and the composite
encoder-decoders (a text, vision or speech encoder with a causal decoder).

Each row checks the module's full `__call__`, then decodes greedily through
`method=`, as the families' `encode` and `decode` do: the encoder runs once (a
method function of this file, natively and through the wrapper), then the decoder
runs token by token with its cache (another method function, the decoder and its
LM head). The cache comes from a third method function, the encoder and the
decoder with `init_cache=True`, which creates every parameter, so that the
wrapper checks the given variables against it.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import adapters

from .checks import Decoding, LinenCase, Spec
from .hf_common import (
    BATCH,
    hf_config,
    hf_config_class,
    LENGTH,
    module_class,
    PACKAGE,
    padded_mask,
    pixels,
    positions,
    token_ids,
    version,
)


VOCAB = 64
DROPOUT = 0.1
AUDIO = 400  # samples: 79 frames after the first convolution, 39 after the second


# ---------------------------------------------------------------------------------
# transformers' Flax T5 and LongT5 bucket relative positions with
# `jnp.clip(x, a_max=...)`, a keyword JAX no longer takes (a TypeError at trace
# time). Without patching either library, the T5-like cases run every call under a
# linen method interceptor (`nn.intercept_methods`, entered by the case's own
# method functions, so on both sides alike) that computes the attention modules'
# `compute_bias` / `compute_side_bias` with the same bucketing, clipped with
# `jnp.minimum`. Where `jnp.clip` still takes `a_max`, transformers' own code runs.


@functools.cache
def _clip_takes_a_max() -> bool:
    try:
        jnp.clip(jnp.zeros(()), a_max=0)
    except TypeError:
        return False
    return True


def _buckets(relative, bidirectional, num_buckets, max_distance):
    """T5's buckets of relative positions (key minus query): half of them exact
    for short distances, the rest logarithmic up to `max_distance`; a direction
    each when bidirectional, else only the past."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = (relative > 0) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    exact = num_buckets // 2
    logarithmic = exact + (
        jnp.log(distance / exact)
        / jnp.log(max_distance / exact)
        * (num_buckets - exact)
    )
    logarithmic = jnp.minimum(logarithmic, num_buckets - 1)
    return (offset + jnp.where(distance < exact, distance, logarithmic)).astype(
        jnp.int32
    )


def _module_buckets(module, relative, bidirectional):
    config = module.config
    return _buckets(
        relative,
        bidirectional,
        config.relative_attention_num_buckets,
        config.relative_attention_max_distance,
    )


def _t5_bias(module, query_length, key_length):
    relative = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    buckets = _module_buckets(module, relative, bidirectional=not module.causal)
    # (1, heads, queries, keys)
    return module.relative_attention_bias(buckets).transpose((2, 0, 1))[None]


def _block_bias(module, block_length):
    # Each block's queries against the keys of three blocks (before, own, after).
    keys = jnp.arange(3 * block_length)
    relative = keys[None, :] - keys[block_length:-block_length, None]
    buckets = _module_buckets(module, relative, bidirectional=True)
    # (1, 1, heads, block, 3 * block)
    return module.relative_attention_bias(buckets).transpose((2, 0, 1))[None, None]


def _side_bias(module, attention_mask, global_segment_ids):
    from transformers.models.longt5 import modeling_flax_longt5 as longt5

    # Tokens attend to the global tokens of their own segment only.
    same = attention_mask[:, :, None] == global_segment_ids[:, None, :]
    mask_bias = jnp.where(same, 0.0, -1e10).astype(module.dtype)[:, None]
    relative = longt5._make_side_relative_position_ids(
        attention_mask, module.global_block_size
    )
    buckets = _module_buckets(module, relative, bidirectional=True)
    # (batch, heads, tokens, global tokens)
    side = module.global_relative_attention_bias(buckets).transpose((0, 3, 1, 2))
    return mask_bias + side


def _bias_interceptor(next_fun, args, kwargs, context):
    from transformers.models.longt5 import modeling_flax_longt5 as longt5
    from transformers.models.t5 import modeling_flax_t5 as t5

    module, name = context.module, context.method_name
    if name == "compute_bias":
        if isinstance(module, (t5.FlaxT5Attention, longt5.FlaxLongT5Attention)):
            return _t5_bias(module, *args, **kwargs)
        if isinstance(
            module,
            (
                longt5.FlaxLongT5LocalAttention,
                longt5.FlaxLongT5TransientGlobalAttention,
            ),
        ):
            return _block_bias(module, *args, **kwargs)
    if name == "compute_side_bias" and isinstance(
        module, longt5.FlaxLongT5TransientGlobalAttention
    ):
        return _side_bias(module, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _t5_bias_fix():
    if _clip_takes_a_max():
        return contextlib.nullcontext()
    return nn.intercept_methods(_bias_interceptor)


# ---------------------------------------------------------------------------------
# Method functions (linen's `method=`): the same function objects go to linen's
# `apply` and to the wrapper's call. Every `encode` returns the encoder's last
# hidden state and the mask the decoder's cross-attention takes over it.


def _t5_decoder(module, ids, mask, hidden, hidden_mask, deterministic, init_cache):
    out = module._get_decoder_module()(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=hidden,
        encoder_attention_mask=hidden_mask,
        deterministic=deterministic,
        init_cache=init_cache,
    )[0]
    config = module.config
    if not config.tie_word_embeddings:
        return module.lm_head(out)
    # Tied: the module rescales the decoder's output and projects it with the
    # shared embedding (its own `decode` does the same).
    out = out * config.d_model**-0.5
    embedding = module.shared.variables["params"]["embedding"]
    return module.lm_head.apply({"params": {"kernel": embedding.T}}, out)


def t5_call(module, *, deterministic=True, **inputs):
    """The module's own `__call__`, with the bucketing fix."""
    with _t5_bias_fix():
        return module(**inputs, deterministic=deterministic)


def t5_encode(module, input_ids, attention_mask, deterministic=True):
    with _t5_bias_fix():
        hidden = module._get_encoder_module()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            deterministic=deterministic,
        )[0]
    return hidden, attention_mask


def t5_decode(
    module,
    decoder_input_ids,
    decoder_attention_mask,
    encoder_hidden_states,
    encoder_attention_mask,
    deterministic=True,
):
    with _t5_bias_fix():
        return _t5_decoder(
            module,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            deterministic,
            init_cache=False,
        )


def t5_init_cache(
    module,
    input_ids,
    attention_mask,
    decoder_input_ids,
    decoder_attention_mask,
    deterministic=True,
):
    hidden, mask = t5_encode(module, input_ids, attention_mask, deterministic)
    with _t5_bias_fix():
        return _t5_decoder(
            module,
            decoder_input_ids,
            decoder_attention_mask,
            hidden,
            mask,
            deterministic,
            init_cache=True,
        )


def _composite_decoder(
    module, ids, mask, position_ids, hidden, hidden_mask, deterministic, init_cache
):
    # The encoder's width may differ from the decoder's: the composite then
    # projects the encoder's output first.
    projection = module._get_projection_module()
    if projection is not None:
        hidden = projection(hidden)
    return module._get_decoder_module()(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        encoder_hidden_states=hidden,
        encoder_attention_mask=hidden_mask,
        deterministic=deterministic,
        init_cache=init_cache,
    )[0]


def composite_decode(
    module,
    decoder_input_ids,
    decoder_attention_mask,
    decoder_position_ids,
    encoder_hidden_states,
    encoder_attention_mask,
    deterministic=True,
):
    return _composite_decoder(
        module,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        encoder_hidden_states,
        encoder_attention_mask,
        deterministic,
        init_cache=False,
    )


def text_encode(module, input_ids, attention_mask, position_ids, deterministic=True):
    hidden = module._get_encoder_module()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        deterministic=deterministic,
    )[0]
    return hidden, attention_mask


def vision_encode(module, pixel_values, deterministic=True):
    hidden = module._get_encoder_module()(
        pixel_values=pixel_values, deterministic=deterministic
    )[0]
    # Every patch is attended to, as the composite's own call does.
    return hidden, jnp.ones(hidden.shape[:2], jnp.int32)


def speech_encode(module, inputs, attention_mask, deterministic=True):
    encoder = module._get_encoder_module()
    hidden = encoder(
        inputs, attention_mask=attention_mask, deterministic=deterministic
    )[0]
    # The audio mask, brought to the frames the convolutions leave, as the
    # composite's own call does for the cross-attention.
    return hidden, encoder._get_feature_vector_attention_mask(
        hidden.shape[1], attention_mask
    )


def _composite_init_cache(encode):
    def init_cache(
        module,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        deterministic=True,
        **encoder_inputs,
    ):
        hidden, mask = encode(module, **encoder_inputs, deterministic=deterministic)
        return _composite_decoder(
            module,
            decoder_input_ids,
            decoder_attention_mask,
            decoder_position_ids,
            hidden,
            mask,
            deterministic,
            init_cache=True,
        )

    init_cache.__name__ = f"{encode.__name__}_init_cache"
    return init_cache


text_init_cache = _composite_init_cache(text_encode)
vision_init_cache = _composite_init_cache(vision_encode)
speech_init_cache = _composite_init_cache(speech_encode)


# ---------------------------------------------------------------------------------
# Greedy decoding through `method=`.


@dataclasses.dataclass(frozen=True)
class Seq2Seq:
    """How a family encodes and decodes: its method functions, the names of the
    case's keyword arguments its encoder takes, and whether its decoder takes
    positions."""

    encode: Callable
    decode: Callable
    init_cache: Callable
    encoder_inputs: tuple[str, ...]
    positional: bool


T5_LIKE = Seq2Seq(
    t5_encode, t5_decode, t5_init_cache, ("input_ids", "attention_mask"), False
)
TEXT = Seq2Seq(
    text_encode,
    composite_decode,
    text_init_cache,
    ("input_ids", "attention_mask", "position_ids"),
    True,
)
VISION = Seq2Seq(
    vision_encode, composite_decode, vision_init_cache, ("pixel_values",), True
)
SPEECH = Seq2Seq(
    speech_encode,
    composite_decode,
    speech_init_cache,
    ("inputs", "attention_mask"),
    True,
)


def seq2seq_decoding(
    case: LinenCase, params, family: Seq2Seq, steps: int = 6
) -> Decoding:
    """A `checks.Decoding` whose steps call `family.decode` with the cache.

    The encoder runs once on each side (natively under `jax.jit`, through the
    wrapper with `method=family.encode` under `eqx.filter_jit`); its outputs are
    compared here (an error fails the decode check) and each side's are carried
    beside its cache, so that the steps of each side read its own."""
    module = case.module
    encoder_inputs = {name: case.kwargs[name] for name in family.encoder_inputs}
    mask = jnp.ones((BATCH, LENGTH), jnp.int32)

    def decoder_inputs(tokens, t):
        inputs = dict(decoder_input_ids=tokens, decoder_attention_mask=mask)
        if family.positional:
            inputs["decoder_position_ids"] = jnp.full(tokens.shape, t, jnp.int32)
        return inputs

    # The cache's shape comes from decoder inputs of the full length.
    init_inputs = {
        **encoder_inputs,
        **decoder_inputs(jnp.ones((BATCH, LENGTH), jnp.int32), 0),
    }
    if family.positional:
        init_inputs["decoder_position_ids"] = positions()

    @jax.jit
    def initial_cache(params):
        _, variables = module.apply(
            {"params": params},
            **init_inputs,
            method=family.init_cache,
            mutable=["cache"],
        )
        return variables["cache"]

    variables = {"params": params, "cache": initial_cache(params)}
    model, state = adapters.to_equinox(
        module,
        variables=variables,
        init_method=family.init_cache,
        deterministic_kwarg="deterministic",
    )
    model = eqx.nn.inference_mode(model)

    native = jax.jit(
        lambda params: module.apply(
            {"params": params},
            **encoder_inputs,
            deterministic=True,
            method=family.encode,
        )
    )(params)
    wrapped, state = eqx.filter_jit(
        lambda model, state: model(state, method=family.encode, **encoder_inputs)
    )(model, state)

    def native_step(carry, tokens, t):
        variables, (hidden, hidden_mask) = carry
        logits, updates = module.apply(
            variables,
            **decoder_inputs(tokens, t),
            encoder_hidden_states=hidden,
            encoder_attention_mask=hidden_mask,
            deterministic=True,
            method=family.decode,
            mutable=["cache"],
        )
        return logits[:, -1], ({**variables, "cache": updates["cache"]}, carry[1])

    def wrapped_step(model, carry, tokens, t):
        state, (hidden, hidden_mask) = carry
        logits, state = model(
            state,
            **decoder_inputs(tokens, t),
            encoder_hidden_states=hidden,
            encoder_attention_mask=hidden_mask,
            method=family.decode,
        )
        return logits[:, -1], (state, carry[1])

    first = token_ids(VOCAB, length=1, seed=5)
    return Decoding(
        (variables, native),
        model,
        (state, wrapped),
        native_step,
        wrapped_step,
        first,
        steps,
        encoded=(native, wrapped),  # compared with the logits
    )


# ---------------------------------------------------------------------------------
# T5, mT5, LongT5.


def _t5_like_case(module):
    return LinenCase(
        module,
        method=t5_call,
        kwargs=dict(
            input_ids=token_ids(VOCAB),
            attention_mask=padded_mask(),
            decoder_input_ids=token_ids(VOCAB, seed=1),
            decoder_attention_mask=padded_mask(),
        ),
    )


# 8 buckets over sequences of 8 tokens: the exact buckets and the logarithmic
# ones are both reached, in both directions for the encoder.
T5_TINY = dict(
    vocab_size=VOCAB,
    d_model=16,
    d_kv=8,
    d_ff=32,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=DROPOUT,
)


def t5():
    # Two layers each: the first layer's relative position bias is handed on to
    # the second (and, decoding, sliced at the cache index).
    config = hf_config("t5", "T5Config", **T5_TINY, num_layers=2, num_decoder_layers=2)
    module = module_class("t5", "FlaxT5ForConditionalGenerationModule")(config)
    return _t5_like_case(module)


def mt5():
    # mT5's Flax classes use T5's module; its config unties the embeddings (no
    # rescaling, an own `lm_head`) and gates the feed-forward (gated-gelu).
    config = hf_config("mt5", "MT5Config", **T5_TINY, num_layers=1)
    model = module_class("mt5", "FlaxMT5ForConditionalGeneration")
    return _t5_like_case(model.module_class(config))


def longt5():
    # Transient-global attention in the encoder: blocks of local_radius + 1 = 3
    # tokens and global blocks of 4 over 8 tokens, so blocks are padded and
    # there are two global tokens; the decoder attends as T5's does.
    config = hf_config(
        "longt5",
        "LongT5Config",
        **T5_TINY,
        num_layers=1,
        encoder_attention_type="transient-global",
        local_radius=2,
        global_block_size=4,
    )
    module = module_class("longt5", "FlaxLongT5ForConditionalGenerationModule")(config)
    return _t5_like_case(module)


def t5_like_decoding(case, params):
    return seq2seq_decoding(case, params, T5_LIKE)


# ---------------------------------------------------------------------------------
# Composites: an encoder and a causal decoder with cross-attention, each built
# from its own config (the composite's setup finds their modules through the auto
# mappings).

TEXT_TINY = dict(
    vocab_size=VOCAB,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    hidden_dropout_prob=DROPOUT,
    attention_probs_dropout_prob=DROPOUT,
)


def _gpt2config(width):
    return hf_config(
        "gpt2",
        "GPT2Config",
        vocab_size=VOCAB,
        n_embd=width,
        n_layer=1,
        n_head=2,
        n_positions=32,
        resid_pdrop=DROPOUT,
        embd_pdrop=DROPOUT,
        attn_pdrop=DROPOUT,
    )


def _composite(family, config_name, module_name, encoder, decoder, needs):
    # Imported here, warnings silenced, rather than by the composite's setup.
    for other, name in needs:
        module_class(other, name)
    config_class = hf_config_class(family, config_name)
    config = config_class.from_encoder_decoder_configs(encoder, decoder)
    return module_class(family, module_name)(config)


def _decoder_kwargs(seed=1):
    return dict(
        decoder_input_ids=token_ids(VOCAB, seed=seed),
        decoder_attention_mask=padded_mask(),
        decoder_position_ids=positions(),
    )


def encoder_decoder():
    bert = hf_config("bert", "BertConfig", **TEXT_TINY, hidden_size=16)
    module = _composite(
        "encoder_decoder",
        "EncoderDecoderConfig",
        "FlaxEncoderDecoderModule",
        bert,
        _gpt2config(16),
        [("bert", "FlaxBertModule"), ("gpt2", "FlaxGPT2LMHeadModule")],
    )
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=token_ids(VOCAB),
            attention_mask=padded_mask(),
            position_ids=positions(),
            **_decoder_kwargs(),
        ),
    )


def vision_encoder_decoder():
    vit = hf_config(
        "vit",
        "ViTConfig",
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=DROPOUT,
        attention_probs_dropout_prob=DROPOUT,
    )
    module = _composite(
        "vision_encoder_decoder",
        "VisionEncoderDecoderConfig",
        "FlaxVisionEncoderDecoderModule",
        vit,
        _gpt2config(32),  # wider than the encoder: `enc_to_dec_proj` projects
        [("vit", "FlaxViTModule"), ("gpt2", "FlaxGPT2LMHeadModule")],
    )
    return LinenCase(module, kwargs=dict(pixel_values=pixels(), **_decoder_kwargs()))


def speech_encoder_decoder():
    # Flax's Wav2Vec2 supports only the layer-normed feature encoder and the
    # stable layer norm; two convolutions bring 400 samples to 39 frames.
    wav2vec2 = hf_config(
        "wav2vec2",
        "Wav2Vec2Config",
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        hidden_dropout=DROPOUT,
        attention_dropout=DROPOUT,
        activation_dropout=DROPOUT,
        feat_proj_dropout=DROPOUT,
    )
    bert = hf_config("bert", "BertConfig", **TEXT_TINY, hidden_size=16)
    module = _composite(
        "speech_encoder_decoder",
        "SpeechEncoderDecoderConfig",
        "FlaxSpeechEncoderDecoderModule",
        wav2vec2,
        bert,
        [("wav2vec2", "FlaxWav2Vec2Module"), ("bert", "FlaxBertForCausalLMModule")],
    )
    rng = np.random.default_rng(0)
    audio = jnp.asarray(rng.standard_normal((BATCH, AUDIO)), jnp.float32)
    audio_mask = np.ones((BATCH, AUDIO), np.int32)
    audio_mask[1, -100:] = 0  # the second clip is shorter: its last frames are padding
    return LinenCase(
        module,
        kwargs=dict(
            inputs=audio, attention_mask=jnp.asarray(audio_mask), **_decoder_kwargs()
        ),
    )


def decoding_of(family: Seq2Seq):
    return lambda case, params: seq2seq_decoding(case, params, family)


T5_EXERCISES = [
    "params",
    "`cache` (init through `init_method=`)",
    "dropout stream",
    "`deterministic=`",
    "`method=` (the call, encode, decode)",
    "padding masks",
    "relative position buckets",
    "cross-attention",
]
COMPOSITE_EXERCISES = [
    "params",
    "`cache` (init through `init_method=`)",
    "dropout stream",
    "`deterministic=`",
    "`method=` (encode, decode)",
    "composite config",
    "cross-attention",
    "tied decoder embeddings",
]
CLIP_NOTE = (
    "transformers' Flax {family} buckets relative positions with "
    "`jnp.clip(x, a_max=...)`, a TypeError on JAX 0.10: the case's own `method=` "
    "functions (the call, encode, decode) compute {methods} under a linen method "
    "interceptor (`nn.intercept_methods`) with the same buckets, clipped by "
    "`jnp.minimum`, on both sides alike."
)


def _clip_note(family, methods):
    return CLIP_NOTE.format(family=family, methods=methods)


ROWS = [
    Spec(
        "transformers/t5",
        PACKAGE,
        version,
        [*T5_EXERCISES, "tied embeddings (rescaled)", "2 layers (bias handed on)"],
        t5,
        decoding=t5_like_decoding,
        note=_clip_note("T5", "the attention's `compute_bias`"),
    ),
    Spec(
        "transformers/mt5",
        PACKAGE,
        version,
        [*T5_EXERCISES, "untied `lm_head`", "gated-gelu feed-forward"],
        mt5,
        decoding=t5_like_decoding,
        note="mT5's Flax classes run T5's module with an `MT5Config`. "
        + _clip_note("T5", "the attention's `compute_bias`"),
    ),
    Spec(
        "transformers/longt5",
        PACKAGE,
        version,
        [*T5_EXERCISES, "transient-global attention", "tied embeddings (rescaled)"],
        longt5,
        decoding=t5_like_decoding,
        note=_clip_note(
            "LongT5", "the attentions' `compute_bias` and `compute_side_bias`"
        )
        + " Its transient-global attention gives `jax.nn.one_hot` float block ids"
        " (a JAX DeprecationWarning, not yet an error).",
    ),
    Spec(
        "transformers/encoder_decoder",
        PACKAGE,
        version,
        [*COMPOSITE_EXERCISES, "BERT encoder, GPT-2 decoder", "padding masks"],
        encoder_decoder,
        decoding=decoding_of(TEXT),
    ),
    Spec(
        "transformers/vision_encoder_decoder",
        PACKAGE,
        version,
        [
            *COMPOSITE_EXERCISES,
            "ViT encoder, GPT-2 decoder",
            "`enc_to_dec_proj` (16 to 32)",
        ],
        vision_encoder_decoder,
        decoding=decoding_of(VISION),
    ),
    Spec(
        "transformers/speech_encoder_decoder",
        PACKAGE,
        version,
        [
            *COMPOSITE_EXERCISES,
            "Wav2Vec2 encoder, BERT decoder",
            "audio padding mask (to frames)",
        ],
        speech_encoder_decoder,
        decoding=decoding_of(SPEECH),
    ),
]
