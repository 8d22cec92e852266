"""Quickstart: both directions, each checked against the native computation.

1. Linen inside Equinox. A small linen classifier with BatchNorm and Dropout is
   wrapped with `adapters.to_equinox` and trained for a few optax steps in plain
   Equinox style (`out, state = model(x, state, key=key)`); the very same steps run
   in native linen (`apply` with `mutable=["batch_stats"]`). The script prints both
   losses side by side and the largest difference in parameters and statistics.
2. Equinox inside linen. A per-example Equinox MLP with `eqx.nn.BatchNorm` becomes
   a linen module with `adapters.to_linen` (batched with `vmap_axis=0`, statistics
   across the batch with `axis_name="batch"`), and `adapters.testing.assert_equivalent`
   proves that linen's `apply` computes what the native Equinox model computes:
   outputs, state updates, gradients and parameters after each Adam step, in
   training and inference mode.

Run: `python examples/quickstart.py [--steps N]`
"""

import argparse

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import adapters


class Classifier(nn.Module):
    """A linen model with every kind of state: params, batch_stats, dropout."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(3)(x)


def make_data(key, n=128):
    """Three Gaussian blobs in 4 dimensions: generated, nothing downloaded."""
    kx, ky = jax.random.split(key)
    labels = jax.random.randint(ky, (n,), 0, 3)
    centres = jnp.array([[2.0, 0, 0, 1], [-2.0, 1, 0, 0], [0.0, -2, 1, 0]])
    x = centres[labels] + jax.random.normal(kx, (n, 4))
    return x, labels


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_equinox(model, state, x, y, keys, optim):
    """Equinox style: filter_grad over the model, state threaded explicitly."""

    @eqx.filter_jit
    def step(model, state, opt_state, key):
        def loss_fn(model, state):
            logits, state = model(x, state, key=key)
            return cross_entropy(logits, y), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, state
        )
        updates, opt_state = optim.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    losses = []
    for key in keys:
        model, state, opt_state, loss = step(model, state, opt_state, key)
        losses.append(float(loss))
    return model, state, losses


def train_linen(module, variables, x, y, keys, optim):
    """Native linen style: apply with mutable batch_stats and rngs."""

    @jax.jit
    def step(params, batch_stats, opt_state, key):
        def loss_fn(params):
            logits, updates = module.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                rngs=adapters.linen_rngs(key, ("dropout",)),
                mutable=["batch_stats"],
            )
            return cross_entropy(logits, y), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = optim.init(params)
    losses = []
    for key in keys:
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, key)
        losses.append(float(loss))
    return {"params": params, "batch_stats": batch_stats}, losses


def max_abs_diff(a, b):
    diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
    return float(max(jax.tree.leaves(diffs)))


def linen_in_equinox(steps: int) -> float:
    """Direction 1: returns the largest |wrapped - native| after `steps` steps."""
    data_key, init_key, train_key = jax.random.split(jax.random.key(0), 3)
    x, y = make_data(data_key)
    module = Classifier()

    # Wrap: params become array leaves, batch_stats an eqx.nn.State.
    model, state = adapters.to_equinox(module, x, key=init_key, train_kwarg="train")
    initial = model.linen_variables(state)

    keys = list(jax.random.split(train_key, steps))
    optim = optax.adam(1e-2)
    model, state, eqx_losses = train_equinox(model, state, x, y, keys, optim)
    linen_variables, linen_losses = train_linen(module, initial, x, y, keys, optim)

    print("1. linen inside Equinox: adapters.to_equinox(Classifier(), ...)")
    print(f"{'step':>4}  {'equinox loss':>12}  {'linen loss':>12}")
    for i, (a, b) in enumerate(zip(eqx_losses, linen_losses, strict=True)):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}")
    diff = max_abs_diff(model.linen_variables(state), linen_variables)
    print(f"max |equinox - linen| over params and batch_stats: {diff:.2e}")

    # Inference: eqx.nn.inference_mode maps onto linen's train=False.
    logits, _ = eqx.nn.inference_mode(model)(x, state)
    native = module.apply(linen_variables, x, train=False)
    accuracy = float((logits.argmax(-1) == y).mean())
    print(f"inference max |equinox - linen|: {max_abs_diff(logits, native):.2e}")
    print(f"train accuracy after {steps} steps: {accuracy:.2%}")
    return diff


class EquinoxMLP(eqx.Module):
    """A per-example Equinox model with state: BatchNorm across the batch axis."""

    hidden: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        # No bias before BatchNorm, which would cancel it (its gradient would be
        # rounding noise, which Adam amplifies differently on each side).
        self.hidden = eqx.nn.Linear(4, 32, use_bias=False, key=k1)
        self.norm = eqx.nn.BatchNorm(32, axis_name="batch", mode="batch")
        self.out = eqx.nn.Linear(32, 3, key=k2)

    def __call__(self, x, state):
        x, state = self.norm(self.hidden(x), state)
        return self.out(jax.nn.relu(x)), state


def equinox_in_linen(steps: int) -> None:
    """Direction 2: raises AssertionError if linen's path differs from Equinox's."""
    x, _ = make_data(jax.random.key(1))
    model, state = eqx.nn.make_with_state(EquinoxMLP)(jax.random.key(2))

    # Wrap: the model's arrays become `params`, its state `batch_stats`.
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    logits, updates = module.apply(variables, x, mutable=["batch_stats"])

    def native_call(model, x, state, *, key=None):
        """The native Equinox path: vmap a per-example model over the batch."""
        return jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)

    adapters.testing.assert_equivalent(
        module,
        variables,  # the linen side: linen's apply of the wrapped module
        model,
        state,  # the native Equinox side
        x,
        call=native_call,
        deterministic_kwarg="inference",  # ToLinen's switch: apply(..., inference=)
        as_linen=lambda m, s: adapters.to_linen(m, s)[1],
        optimizer=optax.adam(1e-2),
        steps=steps,
    )
    print()
    print("2. Equinox inside linen: adapters.to_linen(EquinoxMLP, state, vmap_axis=0)")
    print(f"apply: logits {logits.shape}, params {sorted(variables['params'])}, ")
    print(f"       updated collections {sorted(updates)}")
    print(
        f"adapters.testing.assert_equivalent: outputs, batch_stats, gradients and "
        f"parameters after each of {steps} Adam steps, train and inference mode: "
        "equal to native Equinox"
    )


def main(steps: int = 20) -> float:
    diff = linen_in_equinox(steps)
    equinox_in_linen(min(steps, 5))
    return diff


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
