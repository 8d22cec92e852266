"""transformers rows: vision, audio and multimodal models.

Images are channels-last (the layout the Flax modules take; transformers' model
wrappers transpose from channels-first before calling them).
"""

import jax.numpy as jnp
import numpy as np

from .checks import LinenCase, Spec
from .hf_common import (
    BATCH,
    hf_config,
    hf_config_class,
    module_class,
    PACKAGE,
    padded_mask,
    pixels,
    positions,
    token_ids,
    version,
)


VOCAB = 64
LABELS = 3
IMAGE, PATCH = 16, 4  # 16 patches and a class token
# A tiny transformer: 1 layer, width 16, 2 heads, dropout on.
TINY = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)
# Convolutional networks: two stages of one block, 32x32 images down to 4x4.
CONV_IMAGE = 32


def _vitconfig(**extra):
    return hf_config(
        "vit",
        "ViTConfig",
        **TINY,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=LABELS,
        **extra,
    )


def vit():
    module = module_class("vit", "FlaxViTForImageClassificationModule")(_vitconfig())
    return LinenCase(module, kwargs=dict(pixel_values=pixels(size=IMAGE)))


def beit():
    # Two layers: stochastic depth's rate grows from 0 at the first layer, so
    # only a second layer draws from the `droppath` stream.
    config = hf_config(
        "beit",
        "BeitConfig",
        **{**TINY, "num_hidden_layers": 2},
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=LABELS,
        use_relative_position_bias=True,
        layer_scale_init_value=0.1,
        drop_path_rate=0.1,
        use_mean_pooling=True,
    )
    module = module_class("beit", "FlaxBeitForImageClassificationModule")(config)
    return LinenCase(
        module,
        kwargs=dict(pixel_values=pixels(size=IMAGE)),
        streams=("dropout", "droppath"),
    )


def dinov2():
    config = hf_config(
        "dinov2",
        "Dinov2Config",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=LABELS,
        drop_path_rate=0.1,
    )
    module = module_class("dinov2", "FlaxDinov2ForImageClassificationModule")(config)
    return LinenCase(module, kwargs=dict(pixel_values=pixels(size=IMAGE)))


def resnet():
    config = hf_config(
        "resnet",
        "ResNetConfig",
        embedding_size=8,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="bottleneck",
        num_labels=LABELS,
    )
    module = module_class("resnet", "FlaxResNetForImageClassificationModule")(config)
    return LinenCase(
        module,
        kwargs=dict(pixel_values=pixels(size=CONV_IMAGE)),
        # `deterministic=` switches BatchNorm's `use_running_average`; no dropout.
        streams=(),
        mutable=("batch_stats",),
    )


def regnet():
    config = hf_config(
        "regnet",
        "RegNetConfig",
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        groups_width=4,
        layer_type="y",
        num_labels=LABELS,
    )
    module = module_class("regnet", "FlaxRegNetForImageClassificationModule")(config)
    return LinenCase(
        module,
        kwargs=dict(pixel_values=pixels(size=CONV_IMAGE)),
        streams=(),
        mutable=("batch_stats",),
    )


def _clip_text_inputs(eos_id):
    """Each sequence ends in `eos_id` (where CLIP pools) before its padding."""
    mask = padded_mask()
    ids = np.array(token_ids(eos_id))  # below eos_id
    last = np.asarray(mask).sum(axis=1) - 1
    ids[np.arange(BATCH), last] = eos_id
    ids = np.where(np.asarray(mask) == 1, ids, 0)
    return jnp.asarray(ids, jnp.int32), mask


def clip():
    eos = VOCAB - 1
    config = hf_config(
        "clip",
        "CLIPConfig",
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            attention_dropout=0.1,
            eos_token_id=eos,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=PATCH,
            attention_dropout=0.1,
        ),
        projection_dim=8,
    )
    module = module_class("clip", "FlaxCLIPModule")(config)
    ids, mask = _clip_text_inputs(eos)
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=ids,
            pixel_values=pixels(size=IMAGE),
            attention_mask=mask,
            position_ids=positions(),
        ),
    )


AUDIO = 200  # samples: the feature encoder makes 19 frames of them


def wav2vec2():
    config = hf_config(
        "wav2vec2",
        "Wav2Vec2Config",
        vocab_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout=0.1,
        activation_dropout=0.1,
        attention_dropout=0.1,
        feat_proj_dropout=0.1,
        final_dropout=0.1,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        # The only layouts transformers' Flax port implements.
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )
    module = module_class("wav2vec2", "FlaxWav2Vec2ForCTCModule")(config)
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((BATCH, AUDIO)).astype(np.float32)
    mask = np.ones((BATCH, AUDIO), np.int32)
    mask[1, -40:] = 0  # the second clip is shorter: padding
    audio[1, -40:] = 0.0
    frames = int(module._get_feat_extract_output_lengths(AUDIO))
    # SpecAugment's time mask, given (the Flax port takes it as an input rather
    # than drawing it): three frames of each example replaced by the learnt
    # vector.
    time_mask = np.zeros((BATCH, frames), bool)
    time_mask[0, 2:5] = True
    time_mask[1, 9:12] = True
    return LinenCase(
        module,
        kwargs=dict(
            input_values=jnp.asarray(audio),
            attention_mask=jnp.asarray(mask),
            mask_time_indices=jnp.asarray(time_mask),
        ),
    )


def vision_text_dual_encoder():
    text = hf_config(
        "bert",
        "BertConfig",
        **TINY,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    vision = _vitconfig()
    config = hf_config_class(
        "vision_text_dual_encoder", "VisionTextDualEncoderConfig"
    ).from_vision_text_configs(vision, text, projection_dim=8)
    module = module_class(
        "vision_text_dual_encoder", "FlaxVisionTextDualEncoderModule"
    )(config)
    ids = token_ids(VOCAB)
    return LinenCase(
        module,
        kwargs=dict(
            input_ids=ids,
            pixel_values=pixels(size=IMAGE),
            attention_mask=padded_mask(),
            position_ids=positions(),
            token_type_ids=jnp.zeros_like(ids),
        ),
    )


TRANSFORMER = ["params", "dropout stream", "`deterministic=`"]
OUTPUT = "ModelOutput dataclass output"
CONV = [
    "params",
    "batch_stats",
    "`deterministic=` (BatchNorm's use_running_average)",
    "BatchNorm statistics",
    "no rng stream",
    OUTPUT,
]

ROWS = [
    Spec(
        "transformers/beit",
        PACKAGE,
        version,
        [
            *TRANSFORMER,
            "`droppath` stream (stochastic depth)",
            "relative position bias",
            "layer scale",
            OUTPUT,
        ],
        beit,
    ),
    Spec(
        "transformers/dinov2",
        PACKAGE,
        version,
        [*TRANSFORMER, "layer scale", OUTPUT],
        dinov2,
        note=(
            "drop_path_rate=0.1 is set, but transformers' Flax Dinov2 layer calls "
            "its drop path without `deterministic`, so stochastic depth never "
            "runs (no `droppath` stream is drawn)"
        ),
    ),
    Spec(
        "transformers/vit",
        PACKAGE,
        version,
        [*TRANSFORMER, OUTPUT],
        vit,
    ),
    Spec(
        "transformers/regnet",
        PACKAGE,
        version,
        [*CONV, "grouped convolutions", "squeeze-and-excitation"],
        regnet,
    ),
    Spec(
        "transformers/resnet",
        PACKAGE,
        version,
        [*CONV, "bottleneck blocks"],
        resnet,
    ),
    Spec(
        "transformers/clip",
        PACKAGE,
        version,
        [
            *TRANSFORMER,
            "two inputs (text and image)",
            "padding mask",
            "causal text attention",
            "learnt logit scale",
            "nested ModelOutput dataclass output",
        ],
        clip,
    ),
    Spec(
        "transformers/wav2vec2",
        PACKAGE,
        version,
        [
            *TRANSFORMER,
            "raw audio input",
            "padding mask (audio samples to frames)",
            "`mask_time_indices` (SpecAugment)",
            "weight-normalised positional convolution (a nested `apply`)",
            OUTPUT,
        ],
        wav2vec2,
    ),
    Spec(
        "transformers/vision_text_dual_encoder",
        PACKAGE,
        version,
        [
            *TRANSFORMER,
            "composite: ViT vision and BERT text models",
            "two inputs (text and image)",
            "padding mask",
            "nested ModelOutput dataclass output",
        ],
        vision_text_dual_encoder,
    ),
]
