"""Multi-process training and checkpoints on JAX's distributed engine.

Several processes on this machine form one JAX cluster, as hosts do on a real one:
each calls `jax.distributed.initialize` (coordinator on 127.0.0.1, CPU collectives
through gloo) and owns a few CPU devices, and one global mesh spans them all, the
`"data"` axis across processes and the `"model"` axis within each. Every process
loads only the rows of the batch its own devices hold
(`jax.make_array_from_process_local_data`) and trains, data and model parallel:

- a linen MLP with `batch_stats` and partitioning metadata, wrapped with
  `adapters.to_equinox`, its shardings from `adapters.named_shardings`;
- a linen model holding an Equinox block (BatchNorm across the batch) through
  `adapters.ToLinen`, trained the Flax way.

Each process also trains the same models on one of its devices with the whole
batch and prints the largest difference; the run fails if it exceeds 1e-5.

With `--checkpoint DIR` the processes then save both models together with orbax
(their linen variables, as a Flax program would). `--restore DIR` restores such a
checkpoint onto whatever topology this run has (another number of processes,
devices, another mesh), into the adapters (`with_linen_variables`,
`equinox_model`), checks every array bit for bit against the saved values, and
evaluates the restored models on the new mesh.

Run:
    python examples/multihost_training.py --processes 2 --checkpoint /tmp/run
    python examples/multihost_training.py --processes 1 --devices 8 --mesh 4x2 \\
        --restore /tmp/run

`--processes N` starts N processes of this script itself (on a free port of
127.0.0.1, each ended when the run ends, fails or times out); `--processes 1` runs
in this process. On a real cluster, start one process per host with the
cluster's coordinator address instead (see docs/sharding.md).
"""

import argparse
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import adapters


TOLERANCE = 1e-5
N, FEATURES = 64, 16
LEARNING_RATE = 1e-2


# The two models ----------------------------------------------------------------


class MLP(nn.Module):
    """A linen model with `batch_stats` whose kernels carry partitioning metadata."""

    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.initializers.lecun_normal()
        # No bias before BatchNorm: it gets only rounding-noise gradients, which
        # Adam would scale into full-size steps of random sign, differently on one
        # device and on eight.
        kernel_init = nn.with_partitioning(init, (None, "model"))
        h = nn.Dense(32, use_bias=False, kernel_init=kernel_init)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = nn.relu(h)
        return nn.Dense(1, kernel_init=nn.with_partitioning(init, ("model", None)))(h)


class ResidualBlock(eqx.Module):
    """An Equinox block whose BatchNorm averages over the whole (global) batch."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(32, 32, use_bias=False, key=key)
        self.norm = eqx.nn.BatchNorm(32, axis_name="batch", mode="batch")

    def __call__(self, x, state, *, key=None):
        y, state = self.norm(self.linear(x), state)
        return x + jax.nn.relu(y), state


def block_partition(path, shape):
    """The block's Linear weight (out, in) split over "model"; the rest replicated."""
    return ("model", None) if path[-1] == "weight" and len(shape) == 2 else None


def block():
    return adapters.ToLinen(
        make=lambda key: eqx.nn.make_with_state(ResidualBlock)(key),
        vmap_axis=0,
        axis_name="batch",
        partition=block_partition,
    )


class WithBlock(nn.Module):
    """A linen model holding the Equinox block."""

    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        h = nn.Dense(32, kernel_init=init)(x)
        h = block()(h, inference=not train)
        return nn.Dense(1)(h)


def make_wrapped(key):
    """The linen MLP inside Equinox: `(model, state)`."""
    return adapters.to_equinox(
        MLP(), jnp.zeros((N, FEATURES)), key=key, train_kwarg="train"
    )


def make_linen(key):
    """The linen model's variables: `{"params": ..., "batch_stats": ...}`."""
    return WithBlock().init(key, jnp.zeros((N, FEATURES)), train=False)


def dataset():
    """The whole batch. A real loader reads only its rows; this one is tiny."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, FEATURES), dtype=np.float32)
    y = np.sin(x[:, :4]).sum(axis=1, keepdims=True).astype(np.float32)
    return x, y


# Training steps, the same on the mesh and on one device --------------------------


optim = optax.adam(LEARNING_RATE)


def wrapped_step(static):
    """One Adam step of the wrapped linen model, in Equinox's partition pattern."""

    def step(arrays, state, opt_state, x, y):
        def loss_fn(arrays, state):
            out, state = eqx.combine(arrays, static)(x, state)
            return jnp.mean((out - y) ** 2), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(arrays, state)
        updates, opt_state = optim.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), state, opt_state, loss

    return step


def linen_step(params, batch_stats, opt_state, x, y):
    """One Adam step of the linen model holding the Equinox block, the Flax way."""

    def loss_fn(params):
        out, updates = WithBlock().apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean((out - y) ** 2), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optim.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss


def wrapped_loss(model, state, x, y):
    out, _ = eqx.nn.inference_mode(model)(x, state)
    return jnp.mean((out - y) ** 2)


def linen_loss(variables, x, y):
    return jnp.mean((WithBlock().apply(variables, x, train=False) - y) ** 2)


# One process of the run ----------------------------------------------------------


def say(*parts):
    print(f"[process {jax.process_index()}/{jax.process_count()}]", *parts, flush=True)


def build_mesh(shape):
    devices = np.array(jax.devices())
    # jax.devices() lists each process's devices together, so each row of "data"
    # lies within one process (when there are as many rows as processes): a
    # process's rows of the batch are the rows its devices hold.
    return Mesh(devices.reshape(shape), ("data", "model"))


def local_batch(sharding, x):
    """This process's rows of a batch sharded over "data": the rows its devices
    hold, and nothing else, assembled into one global array."""
    indices = sharding.addressable_devices_indices_map(x.shape).values()
    starts = {index[0].start or 0 for index in indices}
    stops = {index[0].stop or x.shape[0] for index in indices}
    mine = slice(min(starts), max(stops))  # contiguous: see build_mesh
    return jax.make_array_from_process_local_data(sharding, x[mine], x.shape)


def on_host(tree):
    """Every array of `tree` as one numpy array on every process (a collective:
    each process holds only its own shards)."""
    return multihost_utils.process_allgather(tree, tiled=True)


def max_diff(a, b):
    diffs = jax.tree.map(lambda u, v: np.max(np.abs(u - np.asarray(v))), a, b)
    return float(max(jax.tree.leaves(diffs)))


def sharded_init(init, tree, mesh):
    """`init(tree)` (an optimiser's state) placed by the partitioning metadata it
    keeps from `tree` (optax states keep the boxes of the arrays they follow)."""
    shardings = adapters.named_shardings(jax.eval_shape(init, tree), mesh)
    return jax.jit(init, out_shardings=shardings)(tree)


SEED_WRAPPED, SEED_LINEN = 1, 2  # keys are made in the processes, after set-up


def with_shardings(tree, mesh):
    """The arrays of `tree` (abstract or not) as shapes with the shardings their
    partitioning metadata gives on `mesh`: what `jax.jit(out_shardings=)` and an
    orbax restore need to place arrays that no process holds whole."""
    return jax.tree.map(
        lambda s, a: (
            None if s is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        ),
        adapters.named_shardings(tree, mesh),
        tree,
        is_leaf=lambda s: s is None,
    )


def wrapped_variables(key):
    model, state = make_wrapped(key)
    return model.linen_variables(state)


def train(mesh, steps):
    """Trains both models on the mesh and on one local device; returns the trained
    sharded models and the largest difference between the two trainings."""
    is_shape = lambda a: isinstance(a, jax.ShapeDtypeStruct)  # noqa: E731
    key_wrapped, key_linen = jax.random.key(SEED_WRAPPED), jax.random.key(SEED_LINEN)
    wrapped = eqx.filter_eval_shape(make_wrapped, key_wrapped)  # shapes only
    static = eqx.filter(wrapped[0], lambda a: not is_shape(a))
    x, y = dataset()
    batch = NamedSharding(mesh, P("data"))
    xs, ys = local_batch(batch, x), local_batch(batch, y)
    replicated = NamedSharding(mesh, P())
    one_device = jax.local_devices()[0]

    # (a) The wrapped linen model, initialised directly sharded.
    init = lambda key: eqx.filter(make_wrapped(key), eqx.is_array)  # noqa: E731
    wrapped_shardings = adapters.named_shardings(eqx.filter(wrapped, is_shape), mesh)
    arrays, state = jax.jit(init, out_shardings=wrapped_shardings)(key_wrapped)
    opt_state = sharded_init(optim.init, arrays, mesh)
    carry_shardings = jax.tree.map(lambda a: a.sharding, (arrays, state, opt_state))
    step = wrapped_step(static)
    sharded_step = jax.jit(
        step,
        in_shardings=(*carry_shardings, batch, batch),
        out_shardings=(*carry_shardings, replicated),
    )
    carry = (arrays, state, opt_state)
    single = jax.device_put(jax.jit(init)(key_wrapped), one_device)
    single = (*single, jax.jit(optim.init)(single[0]))
    single_step = jax.jit(step)
    for _ in range(steps):
        *carry, loss = sharded_step(*carry, xs, ys)
        *single, _ = single_step(*single, x, y)
    wrapped_diff = max_diff(on_host(carry[:2]), single[:2])
    say(
        f"to_equinox: loss {float(loss):.5f} after {steps} steps; max |mesh - one "
        f"device| over params and batch_stats: {wrapped_diff:.2e}"
    )

    # (b) The linen model holding the Equinox block, initialised directly sharded.
    linen_shardings = adapters.named_shardings(
        jax.eval_shape(make_linen, key_linen), mesh
    )
    variables = jax.jit(make_linen, out_shardings=linen_shardings)(key_linen)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = sharded_init(optim.init, params, mesh)
    flax_shardings = jax.tree.map(
        lambda a: a.sharding, (params, batch_stats, opt_state)
    )
    sharded_linen_step = jax.jit(
        linen_step,
        in_shardings=(*flax_shardings, batch, batch),
        out_shardings=(*flax_shardings, replicated),
    )
    flax_carry = (params, batch_stats, opt_state)
    one = jax.device_put(jax.jit(make_linen)(key_linen), one_device)
    flax_single = (one["params"], one["batch_stats"])
    flax_single = (*flax_single, jax.jit(optim.init)(one["params"]))
    single_linen_step = jax.jit(linen_step)
    with jax.set_mesh(mesh):  # ToLinen unboxes with a sharding constraint
        for _ in range(steps):
            *flax_carry, flax_loss = sharded_linen_step(*flax_carry, xs, ys)
    for _ in range(steps):
        *flax_single, _ = single_linen_step(*flax_single, x, y)
    linen_diff = max_diff(on_host(flax_carry[:2]), flax_single[:2])
    say(
        f"ToLinen block: loss {float(flax_loss):.5f} after {steps} steps; max |mesh - "
        f"one device| over params and batch_stats: {linen_diff:.2e}"
    )

    model = eqx.combine(carry[0], static)
    linen_variables = {"params": flax_carry[0], "batch_stats": flax_carry[1]}
    return (model, carry[1], linen_variables), max(wrapped_diff, linen_diff)


def evaluate(model, state, linen_variables, mesh):
    """Both models' losses on the whole batch, sharded over the mesh's "data"."""
    x, y = dataset()
    batch = NamedSharding(mesh, P("data"))
    xs, ys = local_batch(batch, x), local_batch(batch, y)
    with jax.set_mesh(mesh):
        wrapped = eqx.filter_jit(wrapped_loss)(model, state, xs, ys)
        linen = jax.jit(linen_loss)(linen_variables, xs, ys)
    return np.array([float(wrapped), float(linen)])


def flat(tree):
    """`{"path/to/leaf": array}` of a variables tree (boxes opened)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in leaves
    }


def save(trained, mesh, directory):
    """All processes save the checkpoint together: both models as linen variables.
    Process 0 also writes the saved values and the losses with numpy, to check
    restores against."""
    model, state, linen_variables = trained
    checkpoint = {
        "to_equinox": model.linen_variables(state),
        "with_block": linen_variables,
    }
    path = directory / "checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, checkpoint, force=True)
    values = flat(on_host(checkpoint))
    losses = evaluate(model, state, linen_variables, mesh)
    if jax.process_index() == 0:
        np.savez(directory / "saved_values.npz", losses=losses, **values)
    multihost_utils.sync_global_devices("saved")
    say(
        f"saved {len(values)} arrays to {path} "
        f"(losses {losses[0]:.6f}, {losses[1]:.6f})"
    )


def restore(mesh, directory):
    """Restores the checkpoint onto this run's mesh, into the adapters, and checks
    what they hold against the saved values, bit for bit, and the losses computed on
    this mesh. Returns 1 if an array differs, else the largest loss difference."""
    # The target: the checkpoint's tree as shapes, with this mesh's shardings.
    abstract = {
        "to_equinox": jax.eval_shape(wrapped_variables, jax.random.key(SEED_WRAPPED)),
        "with_block": jax.eval_shape(make_linen, jax.random.key(SEED_LINEN)),
    }
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            directory / "checkpoint", with_shardings(abstract, mesh)
        )

    # Into the adapters: the wrapped model (built from shapes, then given the
    # restored arrays), and the Equinox block taken out of the linen model.
    template, _ = eqx.filter_eval_shape(make_wrapped, jax.random.key(SEED_WRAPPED))
    model, state = template.with_linen_variables(restored["to_equinox"])
    linen_variables = restored["with_block"]
    eqx_block, block_state = block().equinox_model(
        {c: tree["ToLinen_0"] for c, tree in linen_variables.items()}
    )
    kernel = model.variables["params"]["Dense_0"]["kernel"].value
    weight = eqx_block.linear.weight
    say(
        f"restored on {jax.process_count()} process(es) x {len(jax.local_devices())} "
        f"devices, mesh {dict(mesh.shape)}: Dense_0/kernel {kernel.sharding.spec} "
        f"{kernel.addressable_shards[0].data.shape} a device, ToLinen_0/linear/"
        f"weight {weight.sharding.spec} {weight.addressable_shards[0].data.shape}"
    )

    # What the adapters hold, in the checkpoint's layout (the Equinox block wrapped
    # again, the same arrays), against the saved values.
    saved = dict(np.load(directory / "saved_values.npz"))
    saved_losses = saved.pop("losses")
    _, block_again = adapters.to_linen(
        eqx_block, block_state, partition=block_partition
    )
    held = flat(
        on_host(
            {
                "to_equinox": model.linen_variables(state),
                "with_block": linen_variables,
                "block": block_again,
            }
        )
    )
    for name in list(saved):
        if "/ToLinen_0/" in name:
            collection, rest = name.removeprefix("with_block/").split("/ToLinen_0/")
            saved[f"block/{collection}/{rest}"] = saved[name]
    differing = [
        name
        for name in sorted(set(held) | set(saved))
        if name not in held
        or name not in saved
        or (held[name].dtype, held[name].shape)
        != (saved[name].dtype, saved[name].shape)
        or held[name].tobytes() != saved[name].tobytes()
    ]
    say(
        f"restored vs saved: {len(held) - len(differing)} of {len(held)} arrays "
        "equal bit for bit" + (f"; differing: {differing}" if differing else "")
    )
    losses = evaluate(model, state, linen_variables, mesh)
    loss_diff = float(np.max(np.abs(losses - saved_losses)))
    say(
        f"losses on this mesh {losses[0]:.6f}, {losses[1]:.6f}; "
        f"max |restored - saved|: {loss_diff:.2e}"
    )
    return 1.0 if differing else loss_diff


def run_process(args) -> int:
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            coordinator_bind_address=args.coordinator,
            num_processes=args.processes,
            process_id=args.process_id,
            # The launcher's deadline comes first; this one bounds a process
            # left alone.
            initialization_timeout=args.timeout + 30,
        )
    mesh = build_mesh(args.mesh)
    if args.restore:
        worst = restore(mesh, pathlib.Path(args.restore).absolute())
    else:
        trained, worst = train(mesh, args.steps)
        if args.checkpoint:
            save(trained, mesh, pathlib.Path(args.checkpoint).absolute())
    if args.processes > 1:
        jax.distributed.shutdown()
    return 0 if worst <= TOLERANCE else 1


# Starting the processes ---------------------------------------------------------


def default_mesh(devices):
    return (2, devices // 2) if devices > 1 else (1, 1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, argv) -> int:
    """Starts `args.processes` processes of this script, ends them all as soon as
    one fails or the time is up, and prints their output in order."""
    coordinator = f"127.0.0.1:{free_port()}"
    children, readers, outputs = [], [], []
    # A SIGTERM (a test's or a job scheduler's timeout) ends the children too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.monotonic() + args.timeout
    timed_out = False
    try:
        for i in range(args.processes):
            command = [sys.executable, __file__, *argv, "--process-id", str(i)]
            child = subprocess.Popen(
                [*command, "--coordinator", coordinator],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            lines: list[str] = []
            reader = threading.Thread(target=lines.extend, args=(child.stdout,))
            reader.start()
            children.append(child)
            readers.append(reader)
            outputs.append(lines)
        while any(c.poll() is None for c in children):
            if any(c.poll() for c in children):
                break  # one failed: the others may wait for it forever
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        for child, reader in zip(children, readers):
            child.wait()
            reader.join()
    codes = [c.returncode for c in children]
    for i, lines in enumerate(outputs):
        print(f"--- process {i} (exit code {codes[i]}) ---")
        print("".join(line for line in lines if not line.startswith("[Gloo]")), end="")
    if timed_out:
        print(f"timed out after {args.timeout} s: every process was ended")
        return 124
    failed = [code for code in codes if code > 0]  # the others were ended
    return failed[0] if failed else max(codes, key=abs)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--devices",
        type=int,
        help="CPU devices a process (4 with several processes, 1 alone)",
    )
    parser.add_argument(
        "--mesh",
        type=lambda s: tuple(int(n) for n in s.split("x")),
        help="data x model, e.g. 4x2 (default: 2 x the rest)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--checkpoint", help="save the trained models into this directory"
    )
    parser.add_argument(
        "--restore", help="restore this directory's checkpoint instead of training"
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds")
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = 4 if args.processes > 1 else 1
    if args.restore and not (pathlib.Path(args.restore) / "checkpoint").is_dir():
        parser.error(f"no checkpoint in {args.restore} (save one with --checkpoint)")
    mesh = args.mesh or default_mesh(args.processes * args.devices)
    if mesh[0] * mesh[1] != args.processes * args.devices:
        parser.error(
            f"a {mesh[0]}x{mesh[1]} mesh needs {mesh[0] * mesh[1]} devices, not "
            f"{args.processes} process(es) x {args.devices}"
        )
    args.mesh = mesh
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.processes > 1 and args.process_id is None:
        return launch(args, argv)
    return run_process(args)


if __name__ == "__main__":
    sys.exit(main())
