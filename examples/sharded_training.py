"""Sharded training of a wrapped linen model on an 8-device CPU mesh.

A linen MLP whose kernels carry partitioning metadata (`nn.with_partitioning`) is
wrapped with `adapters.to_equinox`. `adapters.named_shardings` turns that metadata
into `NamedSharding`s for a 2 x 4 ("data", "model") mesh; the model is initialised
directly sharded (under `jax.jit` with `out_shardings`, so no device ever holds the
whole model), trained with the batch split over "data" and the kernels over
"model", and the per-device layout is printed. The same steps on one device give
the same parameters.

Run: `python examples/sharded_training.py [--steps N]`
(8 CPU devices are forced here; on a real cluster, drop the XLA flag.)
"""

import argparse
import os


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import equinox as eqx  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import adapters  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(
            64, use_bias=False, kernel_init=nn.with_partitioning(init, (None, "model"))
        )(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = nn.relu(h)
        return nn.Dense(1, kernel_init=nn.with_partitioning(init, ("model", None)))(h)


def layout(name, array):
    """Which slice of `array` each device holds."""
    shards = sorted(array.addressable_shards, key=lambda s: s.device.id)
    parts = ", ".join(f"d{s.device.id}{list(s.data.shape)}" for s in shards[:4])
    return f"  {name:<28} {str(array.sharding.spec):<20} {parts}, ..."


def main(steps: int = 20) -> float:
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"))
    kx, ky, kinit = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (256, 16))
    y = jnp.sum(jnp.sin(x[:, :4]), axis=-1, keepdims=True)

    def make(key):
        return adapters.to_equinox(MLP(), x, key=key, train_kwarg="train")

    # Shardings from the linen metadata, computed on shapes only.
    abstract = eqx.filter_eval_shape(make, kinit)
    is_shape = lambda a: isinstance(a, jax.ShapeDtypeStruct)  # noqa: E731
    static = eqx.filter(abstract[0], lambda a: not is_shape(a))
    shardings = adapters.named_shardings(eqx.filter(abstract, is_shape), mesh)

    @jax.jit
    def init(key):
        model, state = make(key)
        return eqx.filter(model, eqx.is_array), state

    arrays, state = jax.jit(init, out_shardings=shardings)(kinit)

    optim = optax.adam(1e-2)

    def step(arrays, state, opt_state, x, y):
        def loss_fn(arrays, state):
            out, state = eqx.combine(arrays, static)(x, state)
            return jnp.mean((out - y) ** 2), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(arrays, state)
        updates, opt_state = optim.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), state, opt_state, loss

    opt_state = optim.init(arrays)
    carry_shardings = adapters.named_shardings((arrays, state, opt_state), mesh)
    batch = NamedSharding(mesh, P("data"))
    sharded_step = jax.jit(
        step,
        in_shardings=(*carry_shardings, batch, batch),
        out_shardings=(*carry_shardings, NamedSharding(mesh, P())),
    )
    single_step = jax.jit(step)

    carry = jax.device_put((arrays, state, opt_state), carry_shardings)
    single = jax.device_put((arrays, state, opt_state), jax.devices()[0])
    xs, ys = jax.device_put((x, y), batch)
    for i in range(steps):
        *carry, loss = sharded_step(*carry, xs, ys)
        *single, single_loss = single_step(*single, x, y)
        if i % max(1, steps // 4) == 0 or i == steps - 1:
            one = float(single_loss)
            print(f"step {i:>3}  loss {float(loss):.4f}  (one device {one:.4f})")

    params = carry[0].variables["params"]
    print(f"mesh {dict(mesh.shape)} over {len(mesh.devices.flat)} devices; layout:")
    print(layout("batch x", xs))
    print(layout("Dense_0/kernel", params["Dense_0"]["kernel"].value))
    print(layout("Dense_1/kernel", params["Dense_1"]["kernel"].value))
    print(layout("Dense_1/bias", params["Dense_1"]["bias"]))
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        carry[0],
        single[0],
    )
    diff = max(jax.tree.leaves(diffs))
    print(f"max |sharded - one device| over the parameters: {diff:.2e}")
    return diff


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
