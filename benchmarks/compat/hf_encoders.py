"""transformers rows: text encoders (masked language models and classifiers).

Every row runs in training with the dropout stream and in inference
(`deterministic=`), on a batch whose second example ends in padding, so the
attention mask reaches every family's attention.
"""

import jax.numpy as jnp

from .checks import LinenCase, Spec
from .hf_common import (
    hf_config,
    module_class,
    PACKAGE,
    padded_mask,
    positions,
    token_ids,
    version,
)


VOCAB = 64
# One tiny shape for every family: 1 layer, width 16, 2 heads, dropout on.
TINY = dict(
    vocab_size=VOCAB,
    num_hidden_layers=1,
    num_attention_heads=2,
    hidden_size=16,
    intermediate_size=32,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)
LABELS = 3


def _bert_inputs(**extra):
    ids = token_ids(VOCAB)
    return dict(
        input_ids=ids,
        attention_mask=padded_mask(),
        token_type_ids=jnp.zeros_like(ids),
        position_ids=positions(),
        **extra,
    )


def _roberta_inputs(pad_id):
    """RoBERTa's convention: padded tokens are `pad_id`, and positions count from
    `pad_id + 1` over the real tokens, padding keeping `pad_id` (as the
    transformers wrapper computes them from the ids)."""
    mask = padded_mask()
    ids = jnp.where(mask == 1, token_ids(VOCAB), pad_id)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=jnp.zeros_like(ids),
        position_ids=jnp.cumsum(mask, axis=1) * mask + pad_id,
        head_mask=None,
    )


def bert():
    config = hf_config("bert", "BertConfig", **TINY, max_position_embeddings=32)
    module = module_class("bert", "FlaxBertForMaskedLMModule")(config)
    return LinenCase(module, kwargs=_bert_inputs(head_mask=None))


def albert():
    # Two layers in one shared group: ALBERT's cross-layer parameter sharing
    # runs the same weights twice; and embeddings narrower than the hidden size.
    config = hf_config(
        "albert",
        "AlbertConfig",
        **{**TINY, "num_hidden_layers": 2},
        embedding_size=8,
        num_hidden_groups=1,
        inner_group_num=1,
        max_position_embeddings=32,
        classifier_dropout_prob=0.1,
    )
    module = module_class("albert", "FlaxAlbertForMaskedLMModule")(config)
    return LinenCase(module, kwargs=_bert_inputs())


# BigBird's block-sparse attention needs a sequence of whole blocks, with room
# for 2 global, 3 sliding and `num_random_blocks` random blocks per query block.
BIG_BIRD_BLOCK = 2
BIG_BIRD_LENGTH = 16


def big_bird():
    config = hf_config(
        "big_bird",
        "BigBirdConfig",
        **TINY,
        max_position_embeddings=32,
        attention_type="block_sparse",
        block_size=BIG_BIRD_BLOCK,
        num_random_blocks=1,
    )
    module = module_class("big_bird", "FlaxBigBirdForMaskedLMModule")(config)
    ids = token_ids(VOCAB, length=BIG_BIRD_LENGTH)
    mask = padded_mask(length=BIG_BIRD_LENGTH)
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=ids,
            attention_mask=mask,
            token_type_ids=jnp.zeros_like(ids),
            position_ids=positions(length=BIG_BIRD_LENGTH),
            head_mask=None,
        ),
        # Training draws the random blocks' indices from an rng stream.
        streams=("dropout", "indices"),
    )


def distilbert():
    config = hf_config(
        "distilbert",
        "DistilBertConfig",
        vocab_size=VOCAB,
        n_layers=1,
        n_heads=2,
        dim=16,
        hidden_dim=32,
        max_position_embeddings=32,
        dropout=0.1,
        attention_dropout=0.1,
        seq_classif_dropout=0.1,
        num_labels=LABELS,
    )
    module = module_class(
        "distilbert", "FlaxDistilBertForSequenceClassificationModule"
    )(config)
    return LinenCase(
        module, kwargs=dict(input_ids=token_ids(VOCAB), attention_mask=padded_mask())
    )


def electra():
    # The generator's embeddings are narrower than its hidden size (a projection
    # in between), and its head is tied to them.
    config = hf_config(
        "electra",
        "ElectraConfig",
        **TINY,
        embedding_size=8,
        max_position_embeddings=32,
    )
    module = module_class("electra", "FlaxElectraForMaskedLMModule")(config)
    return LinenCase(module, kwargs=_bert_inputs(head_mask=None))


def roberta():
    config = hf_config(
        "roberta", "RobertaConfig", **TINY, max_position_embeddings=32, pad_token_id=1
    )
    module = module_class("roberta", "FlaxRobertaForMaskedLMModule")(config)
    return LinenCase(module, kwargs=_roberta_inputs(config.pad_token_id))


def roberta_prelayernorm():
    config = hf_config(
        "roberta_prelayernorm",
        "RobertaPreLayerNormConfig",
        **TINY,
        max_position_embeddings=32,
        pad_token_id=1,
    )
    module = module_class(
        "roberta_prelayernorm", "FlaxRobertaPreLayerNormForMaskedLMModule"
    )(config)
    return LinenCase(module, kwargs=_roberta_inputs(config.pad_token_id))


def roformer():
    config = hf_config(
        "roformer",
        "RoFormerConfig",
        **TINY,
        embedding_size=16,
        max_position_embeddings=32,
        rotary_value=True,
    )
    module = module_class("roformer", "FlaxRoFormerForMaskedLMModule")(config)
    ids = token_ids(VOCAB)
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=ids,
            attention_mask=padded_mask(),
            token_type_ids=jnp.zeros_like(ids),
            head_mask=None,
        ),
    )


def xlm_roberta():
    config = hf_config(
        "xlm_roberta",
        "XLMRobertaConfig",
        **TINY,
        max_position_embeddings=32,
        pad_token_id=1,
        classifier_dropout=0.1,
        num_labels=LABELS,
    )
    module = module_class(
        "xlm_roberta", "FlaxXLMRobertaForSequenceClassificationModule"
    )(config)
    return LinenCase(module, kwargs=_roberta_inputs(config.pad_token_id))


COMMON = ["params", "dropout stream", "`deterministic=`", "padding mask"]
OUTPUT = "ModelOutput dataclass output"

ROWS = [
    Spec(
        "transformers/albert",
        PACKAGE,
        version,
        [
            *COMMON,
            "cross-layer parameter sharing (2 layers, 1 group)",
            "tied embeddings (narrower than hidden)",
            OUTPUT,
        ],
        albert,
    ),
    Spec(
        "transformers/bert",
        PACKAGE,
        version,
        [*COMMON, "head_mask=None", "tied embeddings", OUTPUT],
        bert,
    ),
    Spec(
        "transformers/big_bird",
        PACKAGE,
        version,
        [
            *COMMON,
            "`indices` stream (random blocks)",
            "block-sparse attention",
            "head_mask=None",
            "tied embeddings",
            OUTPUT,
        ],
        big_bird,
        note=(
            f"block-sparse attention, block size {BIG_BIRD_BLOCK}, on "
            f"{BIG_BIRD_LENGTH} tokens (8 blocks: the PyTorch model would fall "
            "back to full attention at 14 tokens or fewer). Training draws an "
            "`indices` key, so the stream must be declared, but transformers' "
            "Flax port builds its random-block plan with deterministic=True at "
            "lengths other than 1024/3072/4096: the key changes nothing"
        ),
    ),
    Spec(
        "transformers/distilbert",
        PACKAGE,
        version,
        [*COMMON, "no token types or positions in the call", OUTPUT],
        distilbert,
    ),
    Spec(
        "transformers/electra",
        PACKAGE,
        version,
        [
            *COMMON,
            "head_mask=None",
            "embedding projection",
            "tied embeddings",
            OUTPUT,
        ],
        electra,
    ),
    Spec(
        "transformers/roberta",
        PACKAGE,
        version,
        [
            *COMMON,
            "padding-offset positions",
            "head_mask=None",
            "tied embeddings",
            OUTPUT,
        ],
        roberta,
    ),
    Spec(
        "transformers/roberta_prelayernorm",
        PACKAGE,
        version,
        [*COMMON, "pre-LayerNorm", "head_mask=None", "tied embeddings", OUTPUT],
        roberta_prelayernorm,
    ),
    Spec(
        "transformers/roformer",
        PACKAGE,
        version,
        [
            *COMMON,
            "rotary positions (values too)",
            "head_mask=None",
            "tied embeddings",
            OUTPUT,
        ],
        roformer,
    ),
    Spec(
        "transformers/xlm_roberta",
        PACKAGE,
        version,
        [*COMMON, "padding-offset positions", "head_mask=None", OUTPUT],
        xlm_roberta,
    ),
]
