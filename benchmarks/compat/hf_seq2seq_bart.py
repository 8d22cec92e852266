"""transformers rows: encoder-decoders of the BART family (bart, mbart, blenderbot,
blenderbot_small, marian, pegasus) and Whisper, with cached greedy decoding.

Each row checks the full `__call__` of the family's conditional-generation module
(encoder and decoder inputs). Its decoding runs through `method=`, as the family's
`FlaxXPreTrainedModel.encode` / `.decode` do: the encoder runs once on each side
(natively, and through the wrapper with `method=`), then the decoder with its
cache and the LM head runs token by token. The two sides' encoder outputs are
compared too (`Decoding.encoded`).
"""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import adapters

from .checks import Decoding, LinenCase, Spec
from .hf_common import (
    BATCH,
    hf_config,
    LENGTH,
    module_class,
    PACKAGE,
    padded_mask,
    positions,
    token_ids,
    version,
)


VOCAB = 64
# One tiny shape for every family: 1 encoder and 1 decoder layer, width 16,
# 2 heads, every dropout on.
TINY = dict(
    vocab_size=VOCAB,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.1,
)
# The defaults of several families name token ids beyond the tiny vocabulary.
TOKENS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
BART_LIKE = dict(**TINY, **TOKENS, max_position_embeddings=32)


# ---------------------------------------------------------------------------------
# Method functions, passed as `method=` to linen's `apply` and to the wrapper.
# The BART-like families share one encoder and one decoder signature.
# `deterministic` has no default, so a wrapper that did not map its inference
# mode onto it would fail rather than fall back to the default.


def bart_encode(module, input_ids, attention_mask, position_ids, *, deterministic):
    encoder = module._get_encoder_module()
    out = encoder(input_ids, attention_mask, position_ids, deterministic=deterministic)
    return out.last_hidden_state


def _bart_logits(module, hidden):
    # As the family's `decode`: the head is tied to the shared embedding unless the
    # config unties it, and `final_logits_bias` is added.
    if module.config.tie_word_embeddings:
        embedding = module.model.variables["params"]["shared"]["embedding"]
        logits = module.lm_head.apply({"params": {"kernel": embedding.T}}, hidden)
    else:
        logits = module.lm_head(hidden)
    return logits + module.final_logits_bias.astype(module.dtype)


def bart_decode(
    module,
    decoder_input_ids,
    decoder_attention_mask,
    decoder_position_ids,
    encoder_hidden_states,
    encoder_attention_mask,
    *,
    init_cache=False,
    deterministic,
):
    decoder = module._get_decoder_module()
    out = decoder(
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
        init_cache=init_cache,
        deterministic=deterministic,
    )
    return _bart_logits(module, out.last_hidden_state)


def bart_init_cache(
    module,
    input_ids,
    attention_mask,
    position_ids,
    decoder_input_ids,
    decoder_attention_mask,
    decoder_position_ids,
    *,
    deterministic,
):
    # The encoder runs too, so that this init creates every parameter besides the
    # cache: the wrapper checks the given variables against what it creates.
    encoded = bart_encode(
        module, input_ids, attention_mask, position_ids, deterministic=deterministic
    )
    return bart_decode(
        module,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        encoded,
        attention_mask,
        init_cache=True,
        deterministic=deterministic,
    )


def whisper_encode(module, input_features, *, deterministic):
    encoder = module._get_encoder_module()
    return encoder(input_features, deterministic=deterministic).last_hidden_state


def whisper_decode(
    module,
    decoder_input_ids,
    decoder_attention_mask,
    decoder_position_ids,
    encoder_hidden_states,
    *,
    init_cache=False,
    deterministic,
):
    # Whisper's cross-attention takes no encoder mask, and its head is tied to the
    # decoder's token embedding (there is no `final_logits_bias`).
    decoder = module._get_decoder_module()
    out = decoder(
        input_ids=decoder_input_ids,
        attention_mask=decoder_attention_mask,
        position_ids=decoder_position_ids,
        encoder_hidden_states=encoder_hidden_states,
        init_cache=init_cache,
        deterministic=deterministic,
    )
    hidden = out.last_hidden_state
    if module.config.tie_word_embeddings:
        embedding = module.model.decoder.embed_tokens.variables["params"]["embedding"]
        return module.lm_head.apply({"params": {"kernel": embedding.T}}, hidden)
    return module.lm_head(hidden)


def whisper_init_cache(
    module,
    input_features,
    decoder_input_ids,
    decoder_attention_mask,
    decoder_position_ids,
    *,
    deterministic,
):
    encoded = whisper_encode(module, input_features, deterministic=deterministic)
    return whisper_decode(
        module,
        decoder_input_ids,
        decoder_attention_mask,
        decoder_position_ids,
        encoded,
        init_cache=True,
        deterministic=deterministic,
    )


# ---------------------------------------------------------------------------------
# Decoding: encode once on each side, then decode token by token.


def seq2seq_decoding(
    case: LinenCase,
    params,
    *,
    encode: Callable,
    decode: Callable,
    init_cache: Callable,
    encoder_inputs: tuple[str, ...],
    cross_mask: str | None = None,
    max_length: int = LENGTH,
    steps: int = 6,
) -> Decoding:
    """Greedy decoding of an encoder-decoder through `method=`.

    `encoder_inputs` names the case's keyword arguments that `encode` takes;
    `cross_mask` names the one the decoder gets as `encoder_attention_mask`.
    The two sides' encoder outputs go into `Decoding.encoded`, which the decode
    check compares with the logits."""
    module = case.module
    encoder_kwargs = {name: case.kwargs[name] for name in encoder_inputs}
    cross = (
        {}
        if cross_mask is None
        else {"encoder_attention_mask": case.kwargs[cross_mask]}
    )
    mask = jnp.ones((BATCH, max_length), jnp.int32)
    init_kwargs = dict(
        encoder_kwargs,
        decoder_input_ids=jnp.ones((BATCH, max_length), jnp.int32),
        decoder_attention_mask=mask,
        decoder_position_ids=positions(BATCH, max_length),
    )

    # The process's compile settings, as the wrapped encoder and the decoding
    # steps get: the encoder outputs are compared.
    @jax.jit
    def native_setup(params, key):
        cache = module.init(key, **init_kwargs, deterministic=True, method=init_cache)[
            "cache"
        ]
        encoded = module.apply(
            {"params": params}, **encoder_kwargs, deterministic=True, method=encode
        )
        return cache, encoded

    cache, native_encoded = native_setup(params, jax.random.key(1))
    variables = {"params": params, "cache": cache}
    model, state = adapters.to_equinox(
        module,
        variables=variables,
        init_method=init_cache,
        deterministic_kwarg="deterministic",
    )
    model = eqx.nn.inference_mode(model)

    @eqx.filter_jit
    def wrapped_encode(model, state, encoder_kwargs):
        return model(state, **encoder_kwargs, method=encode)

    wrapped_encoded, state = wrapped_encode(model, state, encoder_kwargs)

    def step_kwargs(tokens, t, encoded):
        return dict(
            decoder_input_ids=tokens,
            decoder_attention_mask=mask,
            decoder_position_ids=jnp.full(tokens.shape, t, jnp.int32),
            encoder_hidden_states=encoded,
            **cross,
        )

    def native_step(variables, tokens, t):
        logits, updates = module.apply(
            variables,
            **step_kwargs(tokens, t, native_encoded),
            deterministic=True,
            method=decode,
            mutable=["cache"],
        )
        return logits[:, -1], {**variables, "cache": updates["cache"]}

    def wrapped_step(model, state, tokens, t):
        logits, state = model(
            state, **step_kwargs(tokens, t, wrapped_encoded), method=decode
        )
        return logits[:, -1], state

    first = token_ids(VOCAB, length=1, seed=5)
    return Decoding(
        variables,
        model,
        state,
        native_step,
        wrapped_step,
        first,
        steps,
        encoded=(native_encoded, wrapped_encoded),
    )


# ---------------------------------------------------------------------------------
# The cases.


def _bart_like_case(family, config_name, module_name, **config):
    config = hf_config(family, config_name, **BART_LIKE, **config)
    module = module_class(family, module_name)(config)
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=token_ids(VOCAB),
            attention_mask=padded_mask(),
            decoder_input_ids=token_ids(VOCAB, seed=1),
            decoder_attention_mask=padded_mask(),
            position_ids=positions(),
            decoder_position_ids=positions(),
        ),
    )


bart_decoding = functools.partial(
    seq2seq_decoding,
    encode=bart_encode,
    decode=bart_decode,
    init_cache=bart_init_cache,
    encoder_inputs=("input_ids", "attention_mask", "position_ids"),
    cross_mask="attention_mask",
)


def bart():
    return _bart_like_case(
        "bart", "BartConfig", "FlaxBartForConditionalGenerationModule"
    )


def mbart():
    return _bart_like_case(
        "mbart",
        "MBartConfig",
        "FlaxMBartForConditionalGenerationModule",
        scale_embedding=True,
    )


def blenderbot():
    return _bart_like_case(
        "blenderbot",
        "BlenderbotConfig",
        "FlaxBlenderbotForConditionalGenerationModule",
        scale_embedding=True,
        tie_word_embeddings=False,
    )


def blenderbot_small():
    return _bart_like_case(
        "blenderbot_small",
        "BlenderbotSmallConfig",
        "FlaxBlenderbotSmallForConditionalGenerationModule",
    )


def marian():
    return _bart_like_case(
        "marian", "MarianConfig", "FlaxMarianMTModule", scale_embedding=True
    )


def pegasus():
    return _bart_like_case(
        "pegasus",
        "PegasusConfig",
        "FlaxPegasusForConditionalGenerationModule",
        scale_embedding=True,
    )


WHISPER_MELS, WHISPER_FRAMES = 8, 8  # features (batch, 8, 2 * 8)


def whisper():
    config = hf_config(
        "whisper",
        "WhisperConfig",
        **TINY,
        **TOKENS,
        num_mel_bins=WHISPER_MELS,
        max_source_positions=WHISPER_FRAMES,
        max_target_positions=32,
        # Generation settings only, but their defaults name ids beyond the vocab.
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    module = module_class("whisper", "FlaxWhisperForConditionalGenerationModule")(
        config
    )
    rng = np.random.default_rng(0)
    features = rng.standard_normal((BATCH, WHISPER_MELS, 2 * WHISPER_FRAMES))
    return LinenCase(
        module,
        kwargs=dict(
            input_features=jnp.asarray(features, jnp.float32),
            decoder_input_ids=token_ids(VOCAB, seed=1),
            decoder_attention_mask=padded_mask(),
            decoder_position_ids=positions(),
        ),
    )


whisper_decoding = functools.partial(
    seq2seq_decoding,
    encode=whisper_encode,
    decode=whisper_decode,
    init_cache=whisper_init_cache,
    encoder_inputs=("input_features",),
)


COMMON = [
    "params",
    "`cache` (init method)",
    "dropout stream",
    "`deterministic=`",
    "`method=` (encode, decode)",
]
BART_QUIRKS = ["padding mask (self and cross)"]
FROZEN_BIAS = "final_logits_bias (stop_gradient)"


def _row(family, make_case, quirks, decoding=bart_decoding, note=""):
    return Spec(
        f"transformers/{family}",
        PACKAGE,
        version,
        [*COMMON, *quirks],
        make_case,
        decoding=decoding,
        note=note,
    )


ROWS = [
    _row(
        "bart",
        bart,
        [
            *BART_QUIRKS,
            FROZEN_BIAS,
            "tied embeddings",
            "learned positions (offset 2)",
            "layernorm_embedding",
        ],
    ),
    _row(
        "mbart",
        mbart,
        [
            *BART_QUIRKS,
            FROZEN_BIAS,
            "tied embeddings",
            "scale_embedding",
            "pre-norm + final layer norms",
        ],
    ),
    _row(
        "blenderbot",
        blenderbot,
        [
            *BART_QUIRKS,
            FROZEN_BIAS,
            "untied lm_head",
            "scale_embedding",
            "pre-norm",
            "learned positions (no offset)",
        ],
    ),
    _row(
        "blenderbot_small",
        blenderbot_small,
        [
            *BART_QUIRKS,
            FROZEN_BIAS,
            "tied embeddings",
            "decoder layernorm_embedding before positions",
        ],
    ),
    _row(
        "marian",
        marian,
        [
            *BART_QUIRKS,
            "final_logits_bias trained (no stop_gradient)",
            "tied embeddings",
            "scale_embedding",
            "sinusoidal positions (constants)",
        ],
    ),
    _row(
        "pegasus",
        pegasus,
        [
            *BART_QUIRKS,
            FROZEN_BIAS,
            "tied embeddings",
            "scale_embedding",
            "pre-norm + final layer norms",
            "sinusoidal positions (constants)",
        ],
    ),
    _row(
        "whisper",
        whisper,
        [
            "conv front end (input_features)",
            "frozen sinusoidal encoder positions (stop_gradient)",
            "head tied to the decoder embedding",
            "no encoder mask",
            "decoder padding mask",
        ],
        decoding=whisper_decoding,
    ),
]
