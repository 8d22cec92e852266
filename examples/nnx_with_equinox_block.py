"""An NNX training loop with an Equinox block inside.

The NNX model holds an Equinox MLP block (with `eqx.nn.BatchNorm` and
`eqx.nn.Dropout`) built by `adapters.EquinoxToNNX(make=...)` between two
`nnx.Linear` layers. It trains in the usual NNX loop: `nnx.Optimizer` and
`nnx.jit`, the BatchNorm statistics updated in place, the dropout keys drawn from
the module's NNX RNG stream. Side by side, the same model written natively in
Equinox, with the same initial weights, batches and dropout keys, trains with
optax under `eqx.filter_jit`; the two must stay together.

Run: `python examples/nnx_with_equinox_block.py [--steps N]`
"""

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adapters


FEATURES, WIDTH, HIDDEN, CLASSES, BATCH = 8, 32, 64, 3, 64


class Block(eqx.Module):  # a native, per-example Equinox block
    up: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    down: eqx.nn.Linear

    def __init__(self, width: int, hidden: int, key):
        k1, k2 = jax.random.split(key)
        self.up = eqx.nn.Linear(width, hidden, key=k1)
        self.norm = eqx.nn.BatchNorm(hidden, axis_name="batch", mode="batch")
        self.dropout = eqx.nn.Dropout(0.1)
        self.down = eqx.nn.Linear(hidden, width, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.norm(self.up(x), state)
        h = self.dropout(jax.nn.relu(h), key=key)
        return x + self.down(h), state


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(FEATURES, WIDTH, rngs=rngs)
        # Per example: mapped over the batch axis, the BatchNorm statistics
        # reduced across it; the dropout key drawn from the "dropout" stream.
        self.block = adapters.EquinoxToNNX(
            make=lambda key: eqx.nn.make_with_state(Block)(WIDTH, HIDDEN, key=key),
            rngs=rngs,
            vmap_axis=0,
            axis_name="batch",
        )
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(jax.nn.relu(self.encoder(x))))


class NativeClassifier(eqx.Module):  # the same model in Equinox, per example
    encoder: eqx.nn.Linear
    block: Block
    head: eqx.nn.Linear

    def __call__(self, x, state, *, key=None):
        h, state = self.block(jax.nn.relu(self.encoder(x)), state, key=key)
        return self.head(h), state


def as_native(model: Classifier) -> tuple[NativeClassifier, eqx.nn.State]:
    """The NNX model's current weights as the native model and its state."""

    def linear(layer: nnx.Linear) -> eqx.nn.Linear:  # weight is kernel.T
        shape = eqx.filter_eval_shape(  # no compute: only the structure
            eqx.nn.Linear, *layer.kernel.shape, key=jax.random.key(0)
        )
        weights = (layer.kernel[...].T, layer.bias[...])
        return eqx.tree_at(lambda m: (m.weight, m.bias), shape, weights)

    block, state = model.block.equinox_model()  # the very arrays, no copy
    return NativeClassifier(linear(model.encoder), block, linear(model.head)), state


def make_data(rng: np.random.Generator, n: int):
    """A small classification problem: 3 classes, labelled by a random teacher."""
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    teacher = np.random.default_rng(42).normal(size=(2, FEATURES, CLASSES))
    return x, np.argmax(np.tanh(x @ teacher[0]) + x @ teacher[1], axis=-1)


OPTIM = optax.adam(3e-3)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, x, y):
    def loss_fn(model):
        return cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # grads of the nnx.Params
    optimizer.update(model, grads)  # the BatchNorm statistics were updated in place
    return loss


@eqx.filter_jit
def native_step(native, state, opt_state, x, y, keys):
    def loss_fn(native, state):
        per_example = jax.vmap(
            lambda x, key: native(x, state, key=key),
            axis_name="batch",
            out_axes=(0, None),
        )
        logits, state = per_example(x, keys)
        return cross_entropy(logits, y), state

    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
    (loss, state), grads = grad_fn(native, state)
    params = eqx.filter(native, eqx.is_inexact_array)
    updates, opt_state = OPTIM.update(grads, opt_state, params)
    return eqx.apply_updates(native, updates), state, opt_state, loss


@eqx.filter_jit
def native_predict(native, state, x):
    per_example = jax.vmap(native, (0, None), (0, None), axis_name="batch")
    return per_example(x, state)[0]


def main(steps: int = 200) -> tuple[float, float, float, float]:
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(rng, 1024)
    x_test, y_test = make_data(rng, 512)
    model = Classifier(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, OPTIM, wrt=nnx.Param)
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model))]
    print("NNX variables:", ", ".join("/".join(map(str, p)) for p in paths))

    # The native model starts from the same weights and gets the same dropout
    # keys: EquinoxToNNX forked the "dropout" stream (seed 1) at construction
    # (`rngs["dropout"].fork()`, the stream's first draw: fold_in(key, 0)), draws
    # call i's key from that fork (fold_in(forked, i)), and with vmap_axis splits
    # it into one key per example.
    native, state = as_native(model)
    opt_state = OPTIM.init(eqx.filter(native, eqx.is_inexact_array))
    forked = jax.random.fold_in(jax.random.key(1), 0)

    first = None
    for i in range(steps):
        batch = rng.choice(len(x_train), BATCH, replace=False)
        x, y = x_train[batch], y_train[batch]
        loss = train_step(model, optimizer, x, y)
        keys = jax.random.split(jax.random.fold_in(forked, i), BATCH)
        native, state, opt_state, native_loss = native_step(
            native, state, opt_state, x, y, keys
        )
        first = float(loss) if first is None else first
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:>4}  loss NNX {loss:.6f}  native {native_loss:.6f}")

    # The trained NNX model, taken to Equinox, against the natively trained one.
    diffs = jax.tree.map(
        lambda a, b: jnp.max(jnp.abs(a - b)),
        eqx.filter(as_native(model), eqx.is_inexact_array),
        eqx.filter((native, state), eqx.is_inexact_array),
    )
    param_diff = float(max(jax.tree.leaves(diffs)))
    print(f"final loss: NNX {loss:.6f}, native Equinox {native_loss:.6f}")
    print(f"max |difference| of parameters and statistics: {param_diff:.2e}")

    # Evaluation: model.eval() runs the block in eqx.nn.inference_mode (running
    # statistics, no dropout), as the native model runs in inference mode.
    model.eval()
    logits = nnx.jit(lambda model, x: model(x))(model, x_test)
    native_logits = native_predict(eqx.nn.inference_mode(native), state, x_test)
    eval_diff = float(jnp.max(jnp.abs(logits - native_logits)))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    native_accuracy = jnp.mean(jnp.argmax(native_logits, -1) == y_test)
    print(f"test accuracy: NNX eval {accuracy:.3f}, native {native_accuracy:.3f}")
    print(f"max |difference| of test logits: {eval_diff:.2e}")
    if max(param_diff, eval_diff) > 1e-5:
        sys.exit("NNX and native Equinox training differ by more than 1e-5")
    return first, float(loss), param_diff, eval_diff


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
