"""Port a linen model to native Equinox one module at a time, proving each step.

The linen model has an embedding layer, a BatchNorm, self-attention and a custom
block (`Mixer`). Its parts are ported to native Equinox layers one at a time:
standard layers through `adapters.to_native`, the custom block by an Equinox
rewrite whose weights are moved by a converter registered with
`adapters.register_converter`. After every replacement,
`adapters.testing.assert_equivalent` checks the model against the original linen
model: outputs, BatchNorm statistics, gradients and two optimiser steps, in training
and inference. The migration is shown in two directions:

1. Inside linen: the model stays a linen module, used by the rest of a Flax
   codebase, and its submodules become Equinox modules one at a time, each inside
   `adapters.ToLinen`. At the end every layer is Equinox, in a linen shell.
2. Outside in: the model becomes an Equinox model whose parts are the linen
   submodules wrapped with `adapters.ToEquinox`, replaced one at a time by the
   native layers. The last model holds no linen module at all.

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
    return any(isinstance(p, adapters.ToEquinox) for p in model.parts.values())


def original():
    """The linen model's input and its variables: the reference of every check."""
    x = jax.random.normal(jax.random.key(0), (8, 5, 4))
    return x, Classifier().init(jax.random.key(1), x, train=False)


def steps(quick: bool):
    """`(step, parts ported so far)` after each replacement; quick: the first and
    the last step only."""
    for step in range(len(PARTS) + 1):
        if not quick or step in (0, len(PARTS)):
            yield step, list(PARTS[:step])


def check(variables, model, state, x, as_linen):
    """The candidate computes what the original linen model computes: outputs,
    BatchNorm statistics, gradients, two SGD steps, training and inference."""
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


# --- 1. inside linen: submodules replaced by Equinox modules through ToLinen --------


class PerPosition(eqx.Module):
    """A per-position layer applied to a whole sequence `(length, features)`."""

    layer: eqx.Module

    def __call__(self, x):
        return jax.vmap(self.layer)(x)


class SelfAttention(eqx.Module):
    """`eqx.nn.MultiheadAttention` with the same sequence as query, key and value."""

    attention: eqx.nn.MultiheadAttention

    def __call__(self, x):
        return self.attention(x, x, x)


class ChannelsLast(eqx.Module):
    """A channels-first stateful layer applied to `(length, channels)`."""

    layer: eqx.Module

    def __call__(self, x, state):
        y, state = self.layer(jnp.swapaxes(x, 0, 1), state)
        return jnp.swapaxes(y, 0, 1), state


def unwrap(model):
    """The converted layer inside its per-example adapter."""
    if isinstance(model, (PerPosition, ChannelsLast)):
        return model.layer
    return model.attention if isinstance(model, SelfAttention) else model


def native_part(name, variables):
    """The Equinox replacement of part `name`, per example, with its weights."""
    layer, state = adapters.to_native(
        LINEN_PARTS[name], part_variables(variables, name)
    )
    return {
        "norm": lambda: (ChannelsLast(layer), state),
        "attn": lambda: (SelfAttention(layer), state),
        "head": lambda: (layer, state),  # on pooled features: one vector an example
    }.get(name, lambda: (PerPosition(layer), state))()


def to_linen_part(name, model, state):
    """The Equinox part as a linen submodule: linen's batch axis mapped over;
    deterministic, so no rng stream is passed as `key`."""
    return adapters.ToLinen(
        model=model,
        state=state,
        vmap_axis=0,
        axis_name="batch",
        rng_stream=None,
        name=name,
    )


class LinenHybrid(nn.Module):
    """The classifier, still a linen module, with the parts in `ported` replaced by
    Equinox layers inside `adapters.ToLinen`."""

    ported: tuple = ()  # ((name, model, state), ...)

    @nn.compact
    def __call__(self, x, train: bool):
        ported = {name: (model, state) for name, model, state in self.ported}

        def part(name):
            if name in ported:
                module = to_linen_part(name, *ported[name])
                return lambda x: module(x, inference=not train)
            layer = LINEN_PARTS[name].clone(parent=self, name=name)
            if name == "norm":
                return lambda x: layer(x, use_running_average=not train)
            return (lambda x: layer(x, x)) if name == "attn" else layer

        x = part("embed")(x)
        x = part("norm")(x)
        x = x + part("attn")(x)
        x = part("mixer")(x)
        return part("head")(x.mean(axis=1))


def linen_hybrid(variables, names, x):
    """`LinenHybrid` with `names` ported, and its variables: the original linen
    weights for linen parts, the converted ones (held by ToLinen) for the others."""
    ported = tuple((name, *native_part(name, variables)) for name in names)
    module = LinenHybrid(ported)
    hybrid = module.init(jax.random.key(0), x, train=False)  # for the layout
    hybrid = jax.tree.map(lambda a: a, hybrid)  # plain dicts, a copy of the tree
    for collection, tree in variables.items():
        for name, sub in tree.items():
            if name not in names:
                hybrid[collection][name] = sub
    return module, hybrid


def hybrid_as_linen(module):
    """The hybrid's arrays in the original model's layout (also for gradients)."""
    ported = {name: to_linen_part(name, m, s) for name, m, s in module.ported}

    def as_linen(model, state):
        hybrid = model.linen_variables(state)
        variables = {c: dict(tree) for c, tree in hybrid.items()}
        for name, part in ported.items():
            own = {c: tree[name] for c, tree in hybrid.items() if name in tree}
            wrapper, part_state = part.equinox_model(own)
            layer = unwrap(wrapper)
            for c in hybrid:
                variables[c].pop(name, None)
            for c, tree in adapters.from_native(layer, part_state)[1].items():
                variables.setdefault(c, {})[name] = tree
        return variables

    return as_linen


def migrate_inside_linen(quick: bool = False) -> list[str]:
    x, variables = original()
    print("1. inside linen: submodules become Equinox modules through ToLinen")
    for step, done in steps(quick):
        module, hybrid = linen_hybrid(variables, done, x)
        # The hybrid is a linen module like any other: check it against the
        # original, through its Equinox form (the same apply).
        model, state = adapters.to_equinox(
            module, x, variables=hybrid, train_kwarg="train"
        )
        check(variables, model, state, x, hybrid_as_linen(module))
        ported = ", ".join(done) or "none"
        print(f"step {step}: Equinox parts [{ported}]: equivalent to the linen model")
    kinds = {name: type(unwrap(model)).__name__ for name, model, _ in module.ported}
    print("the linen shell holds:", kinds)
    return done


# --- 2. outside in: an Equinox model of wrapped linen parts, made native ------------


def migrate_outside_in(quick: bool = False) -> list[str]:
    x, variables = original()
    print("2. outside in: linen parts wrapped in Equinox, replaced by native layers")
    for step, done in steps(quick):
        model, state = build(variables, done)
        check(variables, model, state, x, as_linen)
        native = ", ".join(done) or "none"
        print(f"step {step}: native parts [{native}]: equivalent to the linen model")
    assert not uses_linen(model)
    print(
        "the final model is pure Equinox:",
        type(model).__name__,
        {name: type(part).__name__ for name, part in model.parts.items()},
    )
    return done


def main(quick: bool = False) -> tuple[list[str], list[str]]:
    inside = migrate_inside_linen(quick)
    print()
    return inside, migrate_outside_in(quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
