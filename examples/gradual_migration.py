"""Port a linen model to native Equinox one module at a time, proving each step.

The linen model has an embedding layer, a BatchNorm, self-attention and a custom
block (`Mixer`). We start from the whole model wrapped part by part with
`adapters.ToEquinox`, then replace one part at a time by native Equinox layers:
standard layers through `adapters.to_native`, the custom block by an Equinox
rewrite whose weights are moved by a converter registered with
`adapters.register_converter`. After every replacement,
`adapters.testing.assert_equivalent` checks the model against the original linen
model: outputs, BatchNorm statistics, gradients and two optimiser steps, in training
and inference. The last model holds no linen module at all.

Run: `python examples/gradual_migration.py [--quick]`
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import adapters


FEATURES = 16


class Mixer(nn.Module):
    """A custom linen block: a residual two-layer MLP."""

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(2 * FEATURES, name="up")(x))
        return x + nn.Dense(FEATURES, name="down")(h)


class Classifier(nn.Module):
    """The original linen model: (batch, length, 4) -> (batch, 3)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(FEATURES, name="embed")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
        x = Mixer(name="mixer")(x)
        return nn.Dense(3, name="head")(x.mean(axis=1))


# --- the custom block, rewritten by hand in Equinox ---------------------------------


class EqxMixer(eqx.Module):
    """`Mixer` in Equinox, per position: `(features,) -> (features,)`."""

    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


def mixer_to_native(module, variables, convert):
    sub = lambda name: {"params": variables["params"][name]}  # noqa: E731
    return EqxMixer(
        convert(nn.Dense(2 * FEATURES), sub("up")),
        convert(nn.Dense(FEATURES), sub("down")),
    )


def mixer_from_native(layer, state, convert):
    (_, up), (_, down) = convert(layer.up), convert(layer.down)
    return Mixer(), {"params": {"up": up["params"], "down": down["params"]}}


adapters.register_converter(
    Mixer, EqxMixer, to_native=mixer_to_native, from_native=mixer_from_native
)


# --- the model under migration: five parts, each linen-wrapped or native ------------

PARTS = ("embed", "norm", "attn", "mixer", "head")
LINEN_PARTS = {
    "embed": nn.Dense(FEATURES),
    "norm": nn.BatchNorm(momentum=0.9),
    "attn": nn.MultiHeadDotProductAttention(num_heads=2),
    "mixer": Mixer(),
    "head": nn.Dense(3),
}


def part_variables(variables, name):
    return {c: tree[name] for c, tree in variables.items() if name in tree}


class Hybrid(eqx.Module):
    """The classifier as Equinox parts; a part is a `ToEquinox` (still linen) or a
    native Equinox layer. Every part takes and returns the whole batch."""

    parts: dict

    def __call__(self, x, state, *, key=None):
        for name in PARTS:
            part = self.parts[name]
            if name == "head":
                x = x.mean(axis=1)
            if isinstance(part, adapters.ToEquinox):
                y, state = part(x, state)
                x = x + y if name == "attn" else y  # attention is residual
            elif name == "norm":  # LinenBatchNorm: per sequence, channels-first
                y, state = jax.vmap(
                    part, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
                )(jnp.swapaxes(x, 1, 2), state)
                x = jnp.swapaxes(y, 1, 2)
            elif name == "attn":  # MultiheadAttention: per sequence, residual
                x = x + jax.vmap(part)(x, x, x)
            elif name == "mixer":  # per position
                x = jax.vmap(jax.vmap(part))(x)
            else:  # Linear layers: per position
                x = jax.vmap(part)(x) if x.ndim == 2 else jax.vmap(jax.vmap(part))(x)
        return x, state


def wrapped(name, variables):
    kwargs = {"deterministic_kwarg": "use_running_average"} if name == "norm" else {}
    return adapters.ToEquinox(
        LINEN_PARTS[name], variables=part_variables(variables, name), **kwargs
    )


def as_linen(model, state):
    """The hybrid's arrays in the original model's layout (also for gradients)."""
    variables = {}
    for name in PARTS:
        part = model.parts[name]
        if isinstance(part, adapters.ToEquinox):
            sub = part.linen_variables(state)
        else:
            sub = adapters.from_native(part, state)[1]
        for collection, tree in sub.items():
            variables.setdefault(collection, {})[name] = tree
    return variables


def build(variables, native_parts):
    """A hybrid whose `native_parts` are converted, the others wrapped."""

    def make():
        parts = {}
        for name in PARTS:
            if name in native_parts:
                layer, _ = adapters.to_native(
                    LINEN_PARTS[name], part_variables(variables, name)
                )
                # to_native collected its state; keep the initial state in the
                # layer here so that make_with_state gathers all parts' states.
                if name == "norm":
                    stats = variables["batch_stats"]["norm"]
                    layer = eqx.tree_at(
                        lambda m: m.index,
                        layer,
                        eqx.nn.StateIndex((stats["mean"], stats["var"])),
                    )
                parts[name] = layer
            else:
                parts[name] = wrapped(name, variables)
        return Hybrid(parts)

    return eqx.nn.make_with_state(make)()


def uses_linen(model) -> bool:
    modules = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, eqx.Module))
    return any(isinstance(m, adapters.ToEquinox) for m in modules) or any(
        isinstance(p, adapters.ToEquinox) for p in model.parts.values()
    )


def main(quick: bool = False) -> list[str]:
    x = jax.random.normal(jax.random.key(0), (8, 5, 4))
    variables = Classifier().init(jax.random.key(1), x, train=False)
    done: list[str] = []
    for step, name in enumerate([None, *PARTS]):
        if name is not None:
            done.append(name)
        if quick and 0 < step < len(PARTS) - 1:
            continue  # quick: the first, the last but one and the last step
        model, state = build(variables, done)
        adapters.testing.assert_equivalent(
            Classifier(),
            variables,
            model,
            state,
            x,
            train_kwarg="train",
            as_linen=as_linen,
            optimizer=optax.sgd(0.05),
            steps=2,
            rtol=1e-4,
            atol=1e-5,
        )
        native = ", ".join(done) or "none"
        print(f"step {step}: native parts [{native}]: equivalent to the linen model")
    assert not uses_linen(model)
    print(
        "the final model is pure Equinox:",
        type(model).__name__,
        {name: type(part).__name__ for name, part in model.parts.items()},
    )
    return done


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
