"""Shared pieces of the Hugging Face transformers rows: tiny inputs, and greedy
decoding with the cache for causal language models and for encoder-decoders.

Every model is a transformers `Flax...Module` (a linen module) built from a tiny
config written here, with random weights: nothing is downloaded.
"""

import importlib
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import adapters

from .checks import Decoding, FAST_COMPILE, LinenCase


PACKAGE = "transformers"
BATCH, LENGTH = 2, 8


def version() -> str:
    return importlib.metadata.version("transformers")


def module_class(family: str, name: str):
    """`transformers.models.<family>.modeling_flax_<family>.<name>`, imported with
    transformers' deprecation notice for its Flax classes silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(
            f"transformers.models.{family}.modeling_flax_{family}"
        )
    return getattr(module, name)


def hf_config_class(family: str, name: str):
    """`transformers.models.<family>.configuration_<family>.<name>`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(
            f"transformers.models.{family}.configuration_{family}"
        )
    return getattr(module, name)


def hf_config(family: str, name: str, **kwargs):
    """A tiny config of the family, written here (nothing is downloaded)."""
    return hf_config_class(family, name)(**kwargs)


def token_ids(vocab, batch=BATCH, length=LENGTH, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, vocab, size=(batch, length)), dtype=jnp.int32)


def padded_mask(batch=BATCH, length=LENGTH):
    """All ones but the last two positions of the second example (padding)."""
    mask = np.ones((batch, length), np.int32)
    mask[1, -2:] = 0
    return jnp.asarray(mask)


def positions(batch=BATCH, length=LENGTH):
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def pixels(batch=BATCH, size=32, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(
        rng.standard_normal((batch, size, size, channels)), dtype=jnp.float32
    )


def causal_decoding(
    case: LinenCase,
    params,
    call: Callable[[jax.Array, jax.Array, int], dict],
    vocab: int,
    logits_of: Callable = lambda out: out.logits,
    max_length: int = LENGTH,
    steps: int = 6,
) -> Decoding:
    """Greedy decoding for a causal LM whose call takes `init_cache=`.

    `call(tokens, mask, t)` gives the keyword arguments of one decoding call (the
    tokens at position `t`, the (batch, max_length) attention mask, and the
    family's position arguments)."""
    module = case.module
    mask = jnp.ones((BATCH, max_length), jnp.int32)
    full = jnp.ones((BATCH, max_length), jnp.int32)
    init_kwargs = call(full, mask, 0)
    init_kwargs.update(input_ids=full)
    if "position_ids" in init_kwargs:
        init_kwargs["position_ids"] = positions(BATCH, max_length)
    # Only the cache's zeros are kept: a compiled init beats an eager one.
    init = jax.jit(
        lambda key: module.init(key, **init_kwargs, init_cache=True),
        compiler_options=FAST_COMPILE,  # zeros either way
    )
    cache = init(jax.random.key(1))["cache"]
    variables = {"params": params, "cache": cache}
    model, state = adapters.to_equinox(  # linen's own variables: no check needed
        module, variables=variables, deterministic_kwarg="deterministic"
    )
    model = eqx.nn.inference_mode(model)

    def native_step(variables, tokens, t):
        out, updates = module.apply(
            variables, **call(tokens, mask, t), deterministic=True, mutable=["cache"]
        )
        return logits_of(out)[:, -1], {**variables, "cache": updates["cache"]}

    def wrapped_step(model, state, tokens, t):
        out, state = model(state, **call(tokens, mask, t))
        return logits_of(out)[:, -1], state

    first = token_ids(vocab, length=1, seed=5)
    return Decoding(variables, model, state, native_step, wrapped_step, first, steps)
