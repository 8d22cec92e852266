"""A linen training loop with an Equinox block inside.

The linen model holds an Equinox residual block (a Linear layer and an
`eqx.nn.BatchNorm`) built by `adapters.ToLinen(make=...)`. It trains in a plain
Flax loop: `apply(..., mutable=["batch_stats"])`, optax by parameter name (weight
decay only on kernels and weights, chosen with `flax.traverse_util`). At the end the
Equinox block goes back to Equinox with `equinox_model`, and its native output is
checked against the same block inside the linen model.

Run: `python examples/linen_with_equinox_block.py [--steps N]`
"""

import argparse

import equinox as eqx
import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax

import adapters


class ResidualBlock(eqx.Module):
    """A native, per-example Equinox block with state."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, size: int, key):
        self.linear = eqx.nn.Linear(size, size, key=key)
        self.norm = eqx.nn.BatchNorm(size, axis_name="batch", mode="batch")

    def __call__(self, x, state, *, key=None):
        y, state = self.norm(self.linear(x), state)
        return x + jax.nn.relu(y), state


def make_block(key):
    return eqx.nn.make_with_state(ResidualBlock)(32, key)


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(32)(x)
        # The Equinox block is per example: map it over linen's batch axis, with
        # BatchNorm statistics reduced across that axis.
        x = adapters.ToLinen(make=make_block, vmap_axis=0, axis_name="batch")(
            x, inference=not train
        )
        return nn.Dense(1)(x)


def make_data(key, n=256):
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, 8))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y + 0.05 * jax.random.normal(kn, y.shape)


def weight_mask(params):
    """Weight decay by name: only on matrices (`kernel`, `weight`)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: path[-1] in ("kernel", "weight") for path in flat}
    )


def main(steps: int = 200) -> tuple[float, float, float]:
    data_key, init_key = jax.random.split(jax.random.key(0))
    x, y = make_data(data_key)
    model = Regressor()
    variables = model.init(init_key, x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    print("parameters:", sorted(traverse_util.flatten_dict(params, sep="/")))

    optim = optax.adamw(3e-3, weight_decay=1e-4, mask=weight_mask)
    opt_state = optim.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            pred, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((pred - y) ** 2), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    first = None
    for i in range(steps):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        first = float(loss) if first is None else first
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:>4}  loss {float(loss):.4f}")
    last = float(loss)

    # Back to Equinox: the trained block, as a native model with its state.
    block_variables = {
        "params": params["ToLinen_0"],
        "batch_stats": batch_stats["ToLinen_0"],
    }
    block, block_state = adapters.ToLinen(make=make_block).equinox_model(
        block_variables
    )
    h = nn.Dense(32).apply({"params": params["Dense_0"]}, x)
    native, _ = jax.vmap(
        eqx.nn.inference_mode(block),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )(h, block_state)
    inside = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=False,
        capture_intermediates=lambda m, _: isinstance(m, adapters.ToLinen),
        mutable=["intermediates"],
    )[1]["intermediates"]["ToLinen_0"]["__call__"][0]
    diff = float(jnp.max(jnp.abs(native - inside)))
    print(f"loss {first:.4f} -> {last:.4f}")
    print(f"Equinox block natively vs inside linen: max |diff| = {diff:.2e}")
    return first, last, diff


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
