"""transformers rows: causal language models, with cached greedy decoding.

Every row wraps a family's `Flax...ForCausalLMModule` (`...LMHeadModule` for gpt2)
and also decodes greedily with the cache: a fresh cache from `init_cache=True`,
then one token per call, as the family's `generate` does after
`prepare_inputs_for_generation` (an all-ones attention mask as long as the cache,
and, where the family has them, position ids counting up from 0).
"""

import jax.numpy as jnp

from .checks import LinenCase, Spec
from .hf_common import (
    causal_decoding,
    hf_config,
    module_class,
    PACKAGE,
    padded_mask,
    positions,
    token_ids,
    version,
)


VOCAB = 64
# One tiny shape for every family: width 16, 2 heads, dropout on; 1 layer, or 2
# where the family's structure needs them (gpt_neo's global + local layers).
TINY = dict(vocab_size=VOCAB, num_hidden_layers=1, num_attention_heads=2)
# Attention masks are built for every position up front (max_positions ** 2
# booleans per layer): keep it just above the longest sequence.
MAX_POSITIONS = 32
COMMON = ["params", "dropout stream", "`deterministic=`", "`cache` (init_cache)"]


def _positional_case(family, name, config, position_ids=None):
    """A call by `input_ids`, a padded `attention_mask` and `position_ids`."""
    module = module_class(family, name)(config)
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=token_ids(VOCAB),
            attention_mask=padded_mask(),
            position_ids=positions() if position_ids is None else position_ids,
        ),
    )


def _positional_call(tokens, mask, t):
    pos = jnp.full((tokens.shape[0], tokens.shape[1]), t, jnp.int32)
    return dict(input_ids=tokens, attention_mask=mask, position_ids=pos)


def _mask_call(tokens, mask, t):
    # Families without position ids (alibi) read the position from the cache
    # index alone.
    return dict(input_ids=tokens, attention_mask=mask)


def positional_decoding(case, params):
    return causal_decoding(case, params, _positional_call, VOCAB)


def mask_decoding(case, params):
    return causal_decoding(case, params, _mask_call, VOCAB)


def gpt2():
    config = hf_config(
        "gpt2",
        "GPT2Config",
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    return _positional_case("gpt2", "FlaxGPT2LMHeadModule", config)


def gpt_neo():
    # Two layers, one global and one local, with a window shorter than the
    # sequence and than the decoded tokens, so that the local mask cuts.
    config = hf_config(
        "gpt_neo",
        "GPTNeoConfig",
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        attention_types=[[["global", "local"], 1]],
        window_size=3,
        max_position_embeddings=MAX_POSITIONS,
        resid_dropout=0.1,
        embed_dropout=0.1,
        attention_dropout=0.1,
    )
    return _positional_case("gpt_neo", "FlaxGPTNeoForCausalLMModule", config)


def gptj():
    # rotary_dim below the head width: half of each head rotates, half passes.
    config = hf_config(
        "gptj",
        "GPTJConfig",
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_inner=32,
        rotary_dim=4,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    return _positional_case("gptj", "FlaxGPTJForCausalLMModule", config)


def opt():
    # Word embeddings narrower than the model (project_in/out) and tied to the
    # head; positions as OPT derives them from the mask (padding at -1, which the
    # offset of 2 of its learned positions makes valid).
    config = hf_config(
        "opt",
        "OPTConfig",
        **TINY,
        hidden_size=16,
        ffn_dim=32,
        word_embed_proj_dim=8,
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.1,
        attention_dropout=0.1,
    )
    mask = padded_mask()
    position_ids = jnp.cumsum(mask, axis=1) * mask - 1
    return _positional_case("opt", "FlaxOPTForCausalLMModule", config, position_ids)


def bloom():
    config = hf_config(
        "bloom",
        "BloomConfig",
        vocab_size=VOCAB,
        hidden_size=16,
        n_layer=1,
        n_head=2,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    module = module_class("bloom", "FlaxBloomForCausalLMModule")(config)
    return LinenCase(
        module, kwargs=dict(input_ids=token_ids(VOCAB), attention_mask=padded_mask())
    )


def llama():
    # One key/value head for two query heads: grouped-query attention.
    config = hf_config(
        "llama",
        "LlamaConfig",
        **TINY,
        hidden_size=16,
        intermediate_size=32,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        attention_dropout=0.1,
    )
    return _positional_case("llama", "FlaxLlamaForCausalLMModule", config)


def mistral():
    # transformers' Flax Mistral passes `dropout_rate=attention_dropout` to
    # `dot_product_attention_weights` without a `dropout_rng`, so any non-zero
    # rate fails natively in training: this model has no dropout to exercise.
    config = hf_config(
        "mistral",
        "MistralConfig",
        **TINY,
        hidden_size=16,
        intermediate_size=32,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=3,
        attention_dropout=0.0,
    )
    return _positional_case("mistral", "FlaxMistralForCausalLMModule", config)


def gemma():
    config = hf_config(
        "gemma",
        "GemmaConfig",
        **TINY,
        hidden_size=16,
        intermediate_size=32,
        num_key_value_heads=1,
        head_dim=8,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=MAX_POSITIONS,
        attention_dropout=0.1,
    )
    return _positional_case("gemma", "FlaxGemmaForCausalLMModule", config)


def xglm():
    # layerdrop stays 0: XGLM draws it from Python's `random` at trace time, which
    # no rng stream controls.
    config = hf_config(
        "xglm",
        "XGLMConfig",
        vocab_size=VOCAB,
        d_model=16,
        ffn_dim=32,
        num_layers=1,
        attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        layerdrop=0.0,
    )
    return _positional_case("xglm", "FlaxXGLMForCausalLMModule", config)


def _row(
    family, exercises, make_case, decoding=positional_decoding, note="", common=COMMON
):
    return Spec(
        f"transformers/{family}",
        PACKAGE,
        version,
        [*common, *exercises],
        make_case,
        decoding=decoding,
        note=note,
    )


ROWS = [
    _row("gpt2", ["padding mask", "tied embeddings"], gpt2),
    _row(
        "gpt_neo",
        [
            "padding mask",
            "global + local attention layers (window 3)",
            "tied embeddings",
        ],
        gpt_neo,
    ),
    _row("gptj", ["padding mask", "partial rotary embeddings (rotary_dim 4)"], gptj),
    _row(
        "opt",
        [
            "padding mask",
            "positions from the mask (offset 2)",
            "project_in/out",
            "tied embeddings",
        ],
        opt,
    ),
    _row(
        "bloom",
        ["padding mask", "alibi (no position ids)", "tied embeddings"],
        bloom,
        decoding=mask_decoding,
    ),
    _row(
        "llama",
        ["padding mask", "rotary embeddings", "grouped-query attention"],
        llama,
    ),
    _row(
        "mistral",
        [
            "padding mask",
            "rotary embeddings",
            "grouped-query attention",
            "sliding window (3)",
        ],
        mistral,
        # Without dropout, `deterministic=` changes nothing either.
        common=[e for e in COMMON if e not in ("dropout stream", "`deterministic=`")],
        note=(
            "transformers' Flax Mistral fails natively in training with a non-zero"
            " attention_dropout (it gives `dot_product_attention_weights` a rate but"
            " no dropout rng) and has no other dropout: the case sets"
            " attention_dropout=0, so no dropout is exercised."
        ),
    ),
    _row(
        "gemma",
        [
            "padding mask",
            "rotary embeddings",
            "grouped-query attention",
            "tied embeddings",
        ],
        gemma,
    ),
    _row(
        "xglm",
        ["padding mask", "sinusoidal positions (offset 2)", "tied embeddings"],
        xglm,
    ),
]
