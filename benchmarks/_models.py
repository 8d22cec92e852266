"""The models and the wrapped/native step functions that the benchmarks compare.

Four cases, each a wrapped step and the native step it must equal:

- `to_equinox/cnn`: `ToEquinox(LinenCNN)` called from Equinox, against
  `LinenCNN.apply(mutable=["batch_stats"])`;
- `to_equinox/decoder`: `ToEquinox(LinenDecoderBlock)` with linen's `cache` in the
  state, against `apply(mutable=["cache"])`;
- `to_linen/cnn`: linen `apply` of `ToLinen(EqxCNN, vmap_axis=0)`, against
  `jax.vmap(EqxCNN, axis_name="batch")`;
- `to_linen/decoder`: linen `apply` of `ToLinen(EqxDecoderBlock)`, against the
  Equinox call.

A train step is forward, backward, an optax Adam update and the state update
(BatchNorm statistics, or the decode cache); for the decoders it is one decode step
plus a loss on its output. The decoders also have their bare decode step.

Every step takes its arrays as arguments: the wrapped ToEquinox steps use
Equinox's partition pattern (`arrays, static = eqx.partition(model, eqx.is_array)`,
`eqx.combine(arrays, static)` inside), so the jitted function sees exactly the
arrays that linen's `apply` sees.

Randomness: a wrapped call derives its dropout key from the step's key, so the
native step derives it the same way, as the documentation says to reproduce a
wrapped call: `adapters.linen_rngs(key)` for ToEquinox, and for ToLinen the key
that linen's `make_rng("dropout")` draws (`draw_dropout_key`), which is what any
linen layer in ToLinen's place would use.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adapters


# --------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int  # CNN batch
    image: int  # CNN image side
    channels: int  # CNN conv channels
    classes: int
    d: int  # decoder width
    heads: int
    mlp: int
    max_len: int  # decode cache length
    dec_batch: int  # decoder batch


FULL = Sizes(
    batch=32,
    image=16,
    channels=16,
    classes=10,
    d=64,
    heads=4,
    mlp=256,
    max_len=64,
    dec_batch=8,
)
QUICK = Sizes(
    batch=4,
    image=6,
    channels=4,
    classes=3,
    d=8,
    heads=2,
    mlp=16,
    max_len=4,
    dec_batch=2,
)


def sizes(quick: bool) -> Sizes:
    return QUICK if quick else FULL


# ------------------------------------------------------------------- linen models


class LinenCNN(nn.Module):
    channels: int
    classes: int
    rate: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Conv(self.channels, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class LinenDecoderBlock(nn.Module):
    """Pre-LayerNorm transformer block, decoding with linen's `cache` collection."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, decode=True)(h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp)(h)))


# ----------------------------------------------------------------- Equinox models


class EqxCNN(eqx.Module):
    """Per example, `(C, H, W)`; BatchNorm reduces over the vmapped axis "batch"."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    linear: eqx.nn.Linear

    def __init__(self, channels: int, classes: int, key, rate: float = 0.1):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, channels, 3, padding=1, key=k1)
        self.norm1 = eqx.nn.BatchNorm(
            channels, axis_name="batch", mode="batch", momentum=0.9
        )
        self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k2)
        self.norm2 = eqx.nn.BatchNorm(
            channels, axis_name="batch", mode="batch", momentum=0.9
        )
        self.dropout = eqx.nn.Dropout(rate)
        self.linear = eqx.nn.Linear(channels, classes, key=k3)

    def __call__(self, x, state, *, key=None):
        x, state = self.norm1(self.conv1(x), state)
        x = jax.nn.relu(x)
        x, state = self.norm2(self.conv2(x), state)
        x = jax.nn.relu(x)
        x = self.dropout(x.mean(axis=(1, 2)), key=key)
        return self.linear(x), state


class EqxDecodeAttention(eqx.Module):
    """Multi-head self-attention decoding one token per call, its key/value cache
    and position in an `eqx.nn.State` (Equinox's MultiheadAttention has no cache).
    Batched: `x` is `(batch, d)`."""

    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    output: eqx.nn.Linear
    cache: eqx.nn.StateIndex
    heads: int = eqx.field(static=True)

    def __init__(self, d: int, heads: int, batch: int, max_len: int, key):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.query = eqx.nn.Linear(d, d, key=kq)
        self.key = eqx.nn.Linear(d, d, key=kk)
        self.value = eqx.nn.Linear(d, d, key=kv)
        self.output = eqx.nn.Linear(d, d, key=ko)
        self.heads = heads
        shape = (batch, max_len, heads, d // heads)
        self.cache = eqx.nn.StateIndex(
            (jnp.zeros(shape), jnp.zeros(shape), jnp.array(0, jnp.int32))
        )

    def __call__(self, x, state):
        batch, d = x.shape
        head_dim = d // self.heads
        cached_key, cached_value, index = state.get(self.cache)

        def project(linear):
            return jax.vmap(linear)(x).reshape(batch, 1, self.heads, head_dim)

        start = (0, index, 0, 0)
        cached_key = jax.lax.dynamic_update_slice(cached_key, project(self.key), start)
        cached_value = jax.lax.dynamic_update_slice(
            cached_value, project(self.value), start
        )
        q = project(self.query)[:, 0] / math.sqrt(head_dim)
        logits = jnp.einsum("bhd,blhd->bhl", q, cached_key)
        visible = jnp.arange(cached_key.shape[1]) <= index
        logits = jnp.where(visible, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhl,blhd->bhd", weights, cached_value).reshape(batch, d)
        state = state.set(self.cache, (cached_key, cached_value, index + 1))
        return jax.vmap(self.output)(out), state


class EqxDecoderBlock(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attention: EqxDecodeAttention
    norm2: eqx.nn.LayerNorm
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, d: int, heads: int, mlp: int, batch: int, max_len: int, key):
        ka, kh, ko = jax.random.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(d)
        self.attention = EqxDecodeAttention(d, heads, batch, max_len, ka)
        self.norm2 = eqx.nn.LayerNorm(d)
        self.hidden = eqx.nn.Linear(d, mlp, key=kh)
        self.out = eqx.nn.Linear(mlp, d, key=ko)

    def __call__(self, x, state):
        h, state = self.attention(jax.vmap(self.norm1)(x), state)
        x = x + h
        h = jax.vmap(self.hidden)(jax.vmap(self.norm2)(x))
        return x + jax.vmap(self.out)(jax.nn.gelu(h)), state


# ----------------------------------------------------------------- step plumbing


@dataclasses.dataclass
class Step:
    """A pure function to jit, its arguments, and how a steady-state loop feeds
    its outputs back into its arguments."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    feed: Callable[[tuple[Any, ...], Any], tuple[Any, ...]]

    def fresh(self) -> Callable[..., Any]:
        """A new function object computing `fn`, so that no jit cache is hit. It
        keeps `fn`'s name, so its program is the same (`jit_wrapped`, ...)."""
        fn = self.fn

        @functools.wraps(fn)
        def fresh(*args):
            return fn(*args)

        return fresh


@dataclasses.dataclass
class Pair:
    name: str
    wrapped: Step
    native: Step


@dataclasses.dataclass
class Case:
    name: str
    train: Pair
    decode: Pair | None = None
    # Other native train steps, for information: {description: step}.
    variants: dict[str, Step] = dataclasses.field(default_factory=dict)

    def pairs(self) -> list[Pair]:
        return [self.train] + ([self.decode] if self.decode else [])


def _feed_train(args, out):
    return (*out[:3], *args[3:])


def _feed_decode(args, out):
    return (args[0], out[1], *args[2:])


def _normal(*shape, seed=0):
    """Data from numpy: no eager JAX op to compile."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _labels(batch, classes):
    return jnp.asarray(np.random.default_rng(2).integers(0, classes, batch), jnp.int32)


def _fill(shapes, seed=0):
    """Arrays for the abstract leaves of `shapes` (from `jax.eval_shape`), drawn
    with numpy: initialising eagerly compiles every op on its own, and jitting the
    init compiles a program, either of which takes seconds on a small CPU. The
    values matter to no figure: floats are drawn from N(0, 0.1) (state floats are
    1, a valid BatchNorm variance), integers are 0."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            value = 0.1 * rng.normal(size=leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree.map(fill, shapes)


def _state_fill(shapes):
    def fill(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            one = jnp.issubdtype(leaf.dtype, jnp.floating)
            return jnp.asarray(np.full(leaf.shape, float(one)), leaf.dtype)
        return leaf

    return jax.tree.map(fill, shapes)


def _linen_variables(module, *args, **kwargs):
    shapes = jax.eval_shape(
        lambda: module.init(
            adapters.linen_rngs(jax.random.key(0), ("params",)), *args, **kwargs
        )
    )
    return {
        c: (_fill(t) if c == "params" else _state_fill(t)) for c, t in shapes.items()
    }


def _equinox_model(make, *args):
    model, state = eqx.filter_eval_shape(eqx.nn.make_with_state(make), *args)
    return _fill(model), _state_fill(state)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


OPTIMISER = optax.adam(1e-3)


def _equinox_update(model, opt_state, loss):
    """One Adam step of an Equinox model in the partition pattern, for
    `loss(model) -> (value, new_state)`: returns `(arrays, new_state, opt_state,
    value)`. Shared by every Equinox-side train step, wrapped or native."""
    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = OPTIMISER.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    return eqx.filter(model, eqx.is_array), state, opt_state, value


def draw_dropout_key(key):
    """The key that `make_rng("dropout")` draws in a top-level linen module given
    `rngs={"dropout": key}`: the key ToLinen passes to the Equinox model."""
    return _DrawKey().apply({}, rngs={"dropout": key})


class _DrawKey(nn.Module):
    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


# ----------------------------------------------------------- ToEquinox: the CNN


def to_equinox_cnn(s: Sizes) -> Case:
    module = LinenCNN(s.channels, s.classes)
    x = _normal(s.batch, s.image, s.image, 3)
    y = _labels(s.batch, s.classes)
    key = jax.random.key(3)
    model, state = adapters.to_equinox(
        module, variables=_linen_variables(module, x, train=False), train_kwarg="train"
    )
    arrays, static = eqx.partition(model, eqx.is_array)
    variables = model.linen_variables(state)

    def wrapped(arrays, state, opt_state, x, y, key):
        model = eqx.combine(arrays, static)

        def loss(model):
            logits, new_state = model(x, state, key=key)
            return xent(logits, y), new_state

        return _equinox_update(model, opt_state, loss)

    def native_with(rngs_of):
        def native(params, batch_stats, opt_state, x, y, key):
            def loss(params):
                logits, updates = module.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    rngs=rngs_of(key),
                    mutable=["batch_stats"],
                )
                return xent(logits, y), updates["batch_stats"]

            (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = OPTIMISER.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, batch_stats, opt_state, value

        return native

    w_opt = OPTIMISER.init(eqx.filter(model, eqx.is_inexact_array))
    n_opt = OPTIMISER.init(variables["params"])
    native_args = (variables["params"], variables["batch_stats"], n_opt, x, y, key)
    return Case(
        "to_equinox/cnn",
        Pair(
            "to_equinox/cnn/train",
            Step(wrapped, (arrays, state, w_opt, x, y, key), _feed_train),
            Step(native_with(adapters.linen_rngs), native_args, _feed_train),
        ),
        variants={
            'native given rngs={"dropout": key}, not linen_rngs(key)': Step(
                native_with(lambda key: {"dropout": key}), native_args, _feed_train
            )
        },
    )


# ------------------------------------------------------- ToEquinox: the decoder


def to_equinox_decoder(s: Sizes) -> Case:
    module = LinenDecoderBlock(s.heads, s.mlp)
    prompt = jnp.asarray(np.zeros((s.dec_batch, s.max_len, s.d), np.float32))
    x = _normal(s.dec_batch, 1, s.d)
    y = _normal(s.dec_batch, 1, s.d, seed=1)
    model, state = adapters.to_equinox(
        module, variables=_linen_variables(module, prompt)
    )
    arrays, static = eqx.partition(model, eqx.is_array)
    variables = model.linen_variables(state)

    def wrapped_decode(arrays, state, x):
        return eqx.combine(arrays, static)(x, state)

    def native_decode(params, cache, x):
        out, updates = module.apply(
            {"params": params, "cache": cache}, x, mutable=["cache"]
        )
        return out, updates["cache"]

    def wrapped(arrays, state, opt_state, x, y):
        model = eqx.combine(arrays, static)

        def loss(model):
            out, new_state = model(x, state)
            return jnp.mean((out - y) ** 2), new_state

        return _equinox_update(model, opt_state, loss)

    def native(params, cache, opt_state, x, y):
        def loss(params):
            out, cache_ = native_decode(params, cache, x)
            return jnp.mean((out - y) ** 2), cache_

        (value, cache), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMISER.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, cache, opt_state, value

    w_opt = OPTIMISER.init(eqx.filter(model, eqx.is_inexact_array))
    n_opt = OPTIMISER.init(variables["params"])
    params, cache = variables["params"], variables["cache"]
    return Case(
        "to_equinox/decoder",
        Pair(
            "to_equinox/decoder/train",
            Step(wrapped, (arrays, state, w_opt, x, y), _feed_train),
            Step(native, (params, cache, n_opt, x, y), _feed_train),
        ),
        Pair(
            "to_equinox/decoder/decode",
            Step(wrapped_decode, (arrays, state, x), _feed_decode),
            Step(native_decode, (params, cache, x), _feed_decode),
        ),
    )


# --------------------------------------------------------------- ToLinen: the CNN


def to_linen_cnn(s: Sizes) -> Case:
    model, state = _equinox_model(EqxCNN, s.channels, s.classes, jax.random.key(0))
    x = _normal(s.batch, 3, s.image, s.image)
    y = _labels(s.batch, s.classes)
    key = jax.random.key(3)
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    arrays, static = eqx.partition(model, eqx.is_array)

    def wrapped(params, batch_stats, opt_state, x, y, key):
        def loss(params):
            logits, updates = module.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return xent(logits, y), updates["batch_stats"]

        (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMISER.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, batch_stats, opt_state, value

    def native_with(key_of):
        def native(arrays, state, opt_state, x, y, key):
            model = eqx.combine(arrays, static)
            keys = jax.random.split(key_of(key), x.shape[0])

            def loss(model):
                logits, new_state = jax.vmap(
                    lambda x, key: model(x, state, key=key),
                    in_axes=(0, 0),
                    out_axes=(0, None),
                    axis_name="batch",
                )(x, keys)
                return xent(logits, y), new_state

            return _equinox_update(model, opt_state, loss)

        return native

    w_opt = OPTIMISER.init(variables["params"])
    n_opt = OPTIMISER.init(eqx.filter(model, eqx.is_inexact_array))
    native_args = (arrays, state, n_opt, x, y, key)
    return Case(
        "to_linen/cnn",
        Pair(
            "to_linen/cnn/train",
            Step(
                wrapped,
                (variables["params"], variables["batch_stats"], w_opt, x, y, key),
                _feed_train,
            ),
            Step(native_with(draw_dropout_key), native_args, _feed_train),
        ),
        variants={
            "native splits the step's key itself, no make_rng": Step(
                native_with(lambda key: key), native_args, _feed_train
            )
        },
    )


# ----------------------------------------------------------- ToLinen: the decoder


def to_linen_decoder(s: Sizes) -> Case:
    model, state = _equinox_model(
        EqxDecoderBlock, s.d, s.heads, s.mlp, s.dec_batch, s.max_len, jax.random.key(0)
    )
    x = _normal(s.dec_batch, s.d)
    y = _normal(s.dec_batch, s.d, seed=1)
    module, variables = adapters.to_linen(model, state, state_collection="cache")
    arrays, static = eqx.partition(model, eqx.is_array)
    params, cache = variables["params"], variables["cache"]

    def wrapped_decode(params, cache, x):
        out, updates = module.apply(
            {"params": params, "cache": cache}, x, mutable=["cache"]
        )
        return out, updates["cache"]

    def native_decode(arrays, state, x):
        return eqx.combine(arrays, static)(x, state)

    def wrapped(params, cache, opt_state, x, y):
        def loss(params):
            out, cache_ = wrapped_decode(params, cache, x)
            return jnp.mean((out - y) ** 2), cache_

        (value, cache), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMISER.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, cache, opt_state, value

    def native(arrays, state, opt_state, x, y):
        model = eqx.combine(arrays, static)

        def loss(model):
            out, new_state = model(x, state)
            return jnp.mean((out - y) ** 2), new_state

        return _equinox_update(model, opt_state, loss)

    w_opt = OPTIMISER.init(params)
    n_opt = OPTIMISER.init(eqx.filter(model, eqx.is_inexact_array))
    return Case(
        "to_linen/decoder",
        Pair(
            "to_linen/decoder/train",
            Step(wrapped, (params, cache, w_opt, x, y), _feed_train),
            Step(native, (arrays, state, n_opt, x, y), _feed_train),
        ),
        Pair(
            "to_linen/decoder/decode",
            Step(wrapped_decode, (params, cache, x), _feed_decode),
            Step(native_decode, (arrays, state, x), _feed_decode),
        ),
    )


BUILDERS: dict[str, Callable[[Sizes], Case]] = {
    "to_equinox/cnn": to_equinox_cnn,
    "to_equinox/decoder": to_equinox_decoder,
    "to_linen/cnn": to_linen_cnn,
    "to_linen/decoder": to_linen_decoder,
}


@functools.cache
def cases(s: Sizes) -> tuple[Case, ...]:
    """The four cases, built once per process and size (in `run_all`, the scripts
    share them, and JAX's caches with them; `trace_compile` uses fresh functions)."""
    return tuple(build(s) for build in BUILDERS.values())


def pairs(s: Sizes) -> list[Pair]:
    return [pair for case in cases(s) for pair in case.pairs()]
