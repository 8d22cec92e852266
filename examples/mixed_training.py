"""Mixed training: a linen CNN backbone inside an Equinox classifier, on real data.

The data are scikit-learn's handwritten digits (`sklearn.datasets.load_digits`:
1,797 grey 8x8 images, 10 classes, shipped with scikit-learn, nothing downloaded),
split 1,437 / 360 (stratified, seeded) and scaled to [0, 1].

The model is an Equinox classifier (`eqx.Module`) whose backbone is a linen CNN
(`nn.Conv`, `nn.BatchNorm`, `nn.Dropout`, with a `train: bool` argument) wrapped
by `adapters.ToEquinox` inside the classifier's `__init__`, and whose head is an
`eqx.nn.Linear`. `eqx.nn.make_with_state(Classifier)` collects the backbone's
`batch_stats` in one `eqx.nn.State`, as it does for every stateful Equinox layer.
It is trained in Equinox style: `eqx.filter_jit`, `eqx.filter_value_and_grad`,
optax's Adam, the state threaded explicitly, and evaluated under
`eqx.nn.inference_mode` (which the wrapper maps onto linen's `train=False`).

Side by side, the same model is trained in pure linen (the same backbone class
with an `nn.Dense` head, `apply(..., mutable=["batch_stats"])`) from the same
initial weights, on the same batches with the same dropout keys. The script
prints the loss and test accuracy of both sides per epoch, then the final test
accuracies and the largest difference between the two sides' final parameters,
and draws both sides' curves into a PNG.

Run: `python examples/mixed_training.py [--epochs N] [--plot PATH] [--quiet]`
"""

import argparse
import pathlib
import time
from dataclasses import dataclass, field

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import adapters


NUM_CLASSES = 10
FEATURES = 64  # width of the backbone's output, the head's input
STREAMS = ("dropout",)  # the linen rng streams the backbone uses


# --- data -------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # (1437, 8, 8, 1), float32 in [0, 1]
    y_train: np.ndarray  # (1437,), int32
    x_test: np.ndarray  # (360, 8, 8, 1)
    y_test: np.ndarray  # (360,)


def load_data(seed: int = 0) -> Digits:
    """scikit-learn's digits, split 1437/360 with every class in proportion."""
    digits = load_digits()
    # Pixels are integers 0..16; NHWC with one channel, as nn.Conv expects.
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=360, stratify=labels, random_state=seed
    )
    return Digits(x_train, y_train, x_test, y_test)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled index batches; the ragged last batch is dropped so
    every step has the same shape and the jitted steps compile once."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


# --- the model: a linen backbone, an Equinox classifier around it ----------------


class Backbone(nn.Module):
    """A small linen CNN: (batch, 8, 8, 1) -> (batch, FEATURES)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(16, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(32, (3, 3), strides=(2, 2))(x)  # 8x8 -> 4x4
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.relu(nn.Dense(FEATURES)(x))


class Classifier(eqx.Module):
    """Equinox outside, linen inside: the backbone is an `adapters.ToEquinox`."""

    backbone: adapters.ToEquinox
    head: eqx.nn.Linear

    def __init__(self, example: jax.Array, *, key: jax.Array):
        backbone_key, head_key = jax.random.split(key)
        # Built here, inside __init__: `eqx.nn.make_with_state(Classifier)` then
        # finds the backbone's StateIndex and puts its batch_stats in the state.
        self.backbone = adapters.ToEquinox(
            Backbone(), example, key=backbone_key, train_kwarg="train"
        )
        self.head = eqx.nn.Linear(FEATURES, NUM_CLASSES, key=head_key)

    def __call__(
        self, x: jax.Array, state: eqx.nn.State, *, key: jax.Array | None = None
    ) -> tuple[jax.Array, eqx.nn.State]:
        features, state = self.backbone(x, state, key=key)  # linen: a whole batch
        logits = jax.vmap(self.head)(features)  # Equinox: one example at a time
        return logits, state


class LinenClassifier(nn.Module):
    """The same model in pure linen: the same backbone, an `nn.Dense` head."""

    def setup(self):
        self.backbone = Backbone()
        # The backbone shares this module's scope, so its variables and its rng
        # streams sit at the root, exactly as in the wrapped backbone. (A named
        # submodule would fold its name into the dropout keys: other masks.)
        nn.share_scope(self, self.backbone)
        self.head = nn.Dense(NUM_CLASSES)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.head(self.backbone(x, train=train))


def as_linen_variables(model: Classifier, state: eqx.nn.State) -> dict:
    """The Equinox classifier's weights in `LinenClassifier`'s layout."""
    backbone = model.backbone.linen_variables(state)  # the same arrays, no copy
    # eqx.nn.Linear computes weight @ x, nn.Dense x @ kernel: kernel = weight.T.
    head = {"kernel": model.head.weight.T, "bias": model.head.bias}
    return {
        "params": {**backbone["params"], "head": head},
        "batch_stats": backbone["batch_stats"],
    }


# --- training steps ---------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def equinox_step(optim: optax.GradientTransformation):
    """Equinox style: gradients of the model itself, the state threaded through."""

    @eqx.filter_jit
    def step(model, state, opt_state, x, y, key):
        def loss_fn(model, state):
            logits, state = model(x, state, key=key)
            return cross_entropy(logits, y), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, state
        )
        updates, opt_state = optim.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    return step


def linen_step(module: nn.Module, optim: optax.GradientTransformation):
    """Native linen style: `apply` with mutable batch_stats and explicit rngs."""

    @jax.jit
    def step(variables, opt_state, x, y, key):
        def loss_fn(params):
            logits, updates = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                # What ToEquinox does with the `key` it gets: same dropout masks.
                rngs=adapters.linen_rngs(key, STREAMS),
                mutable=["batch_stats"],
            )
            return cross_entropy(logits, y), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        updates, opt_state = optim.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": batch_stats}, opt_state, loss

    return step


@eqx.filter_jit
def equinox_accuracy(model: Classifier, state: eqx.nn.State, x, y) -> jax.Array:
    # In inference mode the backbone gets train=False: running statistics, no
    # dropout, no state update (the state comes back unchanged and is dropped).
    logits, _ = eqx.nn.inference_mode(model)(x, state)
    return jnp.mean(logits.argmax(-1) == y)


def linen_accuracy(module: nn.Module):
    @jax.jit
    def accuracy(variables, x, y):
        logits = module.apply(variables, x, train=False)
        return jnp.mean(logits.argmax(-1) == y)

    return accuracy


def max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
    return float(max(jax.tree.leaves(diffs)))


# --- the run ----------------------------------------------------------------------


@dataclass
class History:
    """Per-epoch mean training loss and test accuracy of one side."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def plot(equinox: History, linen: History, diff: float, path: pathlib.Path) -> None:
    """Two panels, both sides on each. A bare `Figure` renders the PNG with Agg
    and never touches pyplot, so no GUI backend is looked for."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = range(1, len(equinox.loss) + 1)
    # Linen dashed over Equinox solid: where they agree, both stay visible.
    sides = [
        ("Equinox (linen backbone via ToEquinox)", equinox, "-", "o", 6),
        ("pure linen", linen, "--", "x", 7),
    ]
    for label, history, style, marker, size in sides:
        loss_ax.plot(epochs, history.loss, style, marker=marker, ms=size, label=label)
        accuracy = [100 * a for a in history.accuracy]
        acc_ax.plot(epochs, accuracy, style, marker=marker, ms=size, label=label)
    loss_ax.set(
        title="Training loss", xlabel="epoch", ylabel="mean cross-entropy per epoch"
    )
    loss_ax.set_yscale("log")
    acc_ax.set(
        title="Test accuracy (360 images)", xlabel="epoch", ylabel="accuracy (%)"
    )
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        "Digits 8x8: the same CNN trained from Equinox and from linen\n"
        f"final parameters, max |Equinox - linen| = {diff:.1e}"
    )
    fig.savefig(path, dpi=100)


def main(
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    plot_path: str | pathlib.Path = "mixed_training.png",
    progress: bool = True,
) -> dict:
    """Trains both sides, prints the comparison, writes the plot.

    Returns a dict with the final test accuracies (`equinox_accuracy`,
    `linen_accuracy`), the largest parameter difference between the two sides
    (`param_diff`, over params and batch_stats), the per-epoch `loss` and
    `accuracy` of each side (`equinox`, `linen`: `History`), the `plot` path and
    the run time in `seconds`."""
    start = time.perf_counter()
    data = load_data(seed)
    init_key, dropout_key = jax.random.split(jax.random.key(seed))

    # make_with_state collects the wrapped backbone's batch_stats into `state`.
    model, state = eqx.nn.make_with_state(Classifier)(
        jnp.asarray(data.x_train[:1]), key=init_key
    )
    # The linen side starts from the very same weights.
    module = LinenClassifier()
    variables = as_linen_variables(model, state)

    optim = optax.adam(learning_rate)
    eqx_opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    linen_opt_state = optim.init(variables["params"])
    eqx_step, lin_step = equinox_step(optim), linen_step(module, optim)
    lin_accuracy = linen_accuracy(module)

    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    shuffle = np.random.default_rng(seed)
    steps_per_epoch = len(data.x_train) // batch_size
    eqx_history, linen_history = History(), History()
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc="training",
        unit="step",
        disable=not progress,
    )
    step = 0
    for _ in range(epochs):
        eqx_losses, linen_losses = [], []
        for idx in batches(len(data.x_train), batch_size, shuffle):
            x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
            # One key per step, given to both sides: the same dropout masks.
            key = jax.random.fold_in(dropout_key, step)
            model, state, eqx_opt_state, eqx_loss = eqx_step(
                model, state, eqx_opt_state, x, y, key
            )
            variables, linen_opt_state, linen_loss = lin_step(
                variables, linen_opt_state, x, y, key
            )
            eqx_losses.append(eqx_loss)
            linen_losses.append(linen_loss)
            step += 1
            bar.update()
        eqx_history.loss.append(float(jnp.mean(jnp.stack(eqx_losses))))
        linen_history.loss.append(float(jnp.mean(jnp.stack(linen_losses))))
        eqx_history.accuracy.append(
            float(equinox_accuracy(model, state, x_test, y_test))
        )
        linen_history.accuracy.append(float(lin_accuracy(variables, x_test, y_test)))
        bar.set_postfix(
            eqx_acc=f"{eqx_history.accuracy[-1]:.3f}",
            linen_acc=f"{linen_history.accuracy[-1]:.3f}",
        )
    bar.close()

    header = ["epoch", "loss: equinox", "linen", "test acc: equinox", "linen"]
    widths = [5, 13, 9, 17, 6]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for i in range(epochs):
        print(
            f"{i + 1:>5}  {eqx_history.loss[i]:>13.5f}  {linen_history.loss[i]:>9.5f}  "
            f"{eqx_history.accuracy[i]:>17.2%}  {linen_history.accuracy[i]:>6.2%}"
        )
    diff = max_abs_diff(as_linen_variables(model, state), variables)
    path = pathlib.Path(plot_path)
    plot(eqx_history, linen_history, diff, path)
    seconds = time.perf_counter() - start

    print()
    print(f"{'':<36}{'Equinox':>10}{'linen':>10}")
    print(
        f"{'final test accuracy (360 images)':<36}"
        f"{eqx_history.accuracy[-1]:>10.2%}{linen_history.accuracy[-1]:>10.2%}"
    )
    print(f"max |equinox - linen| over params and batch_stats: {diff:.2e}")
    print(f"plot: {path}")
    print(f"{epochs} epochs x {steps_per_epoch} steps, both sides: {seconds:.1f} s")
    return {
        "equinox_accuracy": eqx_history.accuracy[-1],
        "linen_accuracy": linen_history.accuracy[-1],
        "param_diff": diff,
        "equinox": eqx_history,
        "linen": linen_history,
        "plot": path,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="mixed_training.png", help="PNG to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    main(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        plot_path=args.plot,
        progress=not args.quiet,
    )
