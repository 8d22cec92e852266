"""Sharded training through the adapters on an 8-device CPU mesh.

Run by `tests/test_sharding.py` in a fresh process, since the device count must be
set before JAX starts: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/multidevice_checks.py`. Each check compares sharded training with the same
training on one device, and checks where the arrays live.
"""

import os
import sys


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import chex  # noqa: E402
import equinox as eqx  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import adapters  # noqa: E402


STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-6)


class ShardedMLP(nn.Module):
    """A linen model whose kernels carry partitioning metadata."""

    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.initializers.lecun_normal()
        # No bias before BatchNorm: it would get only rounding-noise gradients,
        # which Adam scales up differently on one device and on eight.
        kernel_init = nn.with_partitioning(init, (None, "model"))
        x = nn.Dense(16, use_bias=False, kernel_init=kernel_init)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.Dense(4, kernel_init=nn.with_partitioning(init, ("model", None)))(x)


def mesh_of(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def data(key, n=16):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, 8)), jax.random.normal(ky, (n, 4))


def spec_of(x):
    return x.sharding.spec


def check_linen_in_equinox(mesh_shape):
    """A wrapped linen model with batch_stats, trained with its arrays sharded as
    its linen metadata says, equals the same training on one device."""
    x, y = data(jax.random.key(0))
    model, state = adapters.to_equinox(
        ShardedMLP(), x, key=jax.random.key(1), train_kwarg="train"
    )
    arrays, static = eqx.partition(model, eqx.is_array)
    optim = optax.adam(1e-2)

    def step(arrays, state, opt_state, x, y):
        def loss_fn(arrays, state):
            out, state = eqx.combine(arrays, static)(x, state)
            return jnp.mean((out - y) ** 2), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(arrays, state)
        updates, opt_state = optim.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), state, opt_state, loss

    # One device.
    single = (arrays, state, optim.init(arrays))
    single_step = jax.jit(step)
    for _ in range(STEPS):
        *single, loss = single_step(*single, x, y)

    # The mesh: shardings from the linen metadata, batch over "data".
    mesh = mesh_of(mesh_shape)
    opt_state = optim.init(arrays)
    shardings = adapters.named_shardings((arrays, state, opt_state), mesh)
    batch = NamedSharding(mesh, P("data"))
    carry = jax.device_put((arrays, state, opt_state), shardings)
    x_s, y_s = jax.device_put((x, y), batch)
    sharded_step = jax.jit(
        step,
        in_shardings=(*shardings, batch, batch),
        out_shardings=(*shardings, NamedSharding(mesh, P())),
    )
    with jax.transfer_guard("disallow"):  # no host round trip inside the steps
        for _ in range(STEPS):
            *carry, loss_s = sharded_step(*carry, x_s, y_s)

    chex.assert_trees_all_close(carry[0], single[0], **TOL)
    chex.assert_trees_all_close(carry[1], single[1], **TOL)
    chex.assert_trees_all_close(loss_s, loss, **TOL)
    params = carry[0].variables["params"]
    assert spec_of(params["Dense_0"]["kernel"].value) == P(None, "model")
    assert spec_of(params["Dense_1"]["kernel"].value) == P("model", None)
    assert spec_of(params["Dense_1"]["bias"]) == P()
    assert x_s.sharding.spec == P("data")
    # The model-parallel kernel really is split: each device holds a slice.
    kernel = params["Dense_0"]["kernel"].value
    model_size = mesh.shape["model"]
    assert kernel.addressable_shards[0].data.shape == (8, 16 // model_size)
    print(f"ok linen-in-equinox mesh={mesh_shape}")


def check_sharded_init():
    """Init under jax.jit with out_shardings: no device holds the whole model."""
    x, _ = data(jax.random.key(0))
    mesh = mesh_of((2, 4))
    make = lambda key: adapters.to_equinox(  # noqa: E731
        ShardedMLP(), x, key=key, train_kwarg="train"
    )
    abstract = eqx.filter_eval_shape(make, jax.random.key(1))
    shardings = adapters.named_shardings(
        eqx.filter(abstract, lambda a: isinstance(a, jax.ShapeDtypeStruct)), mesh
    )

    @jax.jit
    def init(key):
        model, state = make(key)
        return eqx.filter(model, eqx.is_array), state

    arrays, state = jax.jit(init, out_shardings=shardings)(jax.random.key(1))
    static = eqx.filter(abstract[0], lambda a: not isinstance(a, jax.ShapeDtypeStruct))
    model = eqx.combine(arrays, static)
    reference, reference_state = make(jax.random.key(1))
    chex.assert_trees_all_equal(
        model.linen_variables(state), reference.linen_variables(reference_state)
    )
    kernel = model.variables["params"]["Dense_0"]["kernel"].value
    assert spec_of(kernel) == P(None, "model")
    assert kernel.addressable_shards[0].data.shape == (8, 4)
    print("ok sharded init")


class ResidualBlock(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(16, 16, use_bias=False, key=key)  # BatchNorm next
        self.norm = eqx.nn.BatchNorm(16, axis_name="batch", mode="batch")

    def __call__(self, x, state, *, key=None):
        y, state = self.norm(self.linear(x), state)
        return x + jax.nn.relu(y), state


def block_partition(path, shape):
    # Equinox Linear weights are (out, in): split the output features.
    return ("model", None) if path[-1] == "weight" and len(shape) == 2 else None


class WithEquinoxBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(16, kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        x = adapters.ToLinen(
            make=lambda key: eqx.nn.make_with_state(ResidualBlock)(key),
            vmap_axis=0,
            axis_name="batch",
            partition=block_partition,
        )(x, inference=not train)
        return nn.Dense(4)(x)


def check_equinox_in_linen(mesh_shape):
    """A linen model with an Equinox block: sharded from nn.get_partition_spec,
    trained in a Flax loop, equals the same training on one device."""
    x, y = data(jax.random.key(2))
    variables = WithEquinoxBlock().init(jax.random.key(3), x, train=False)
    block_weight = variables["params"]["ToLinen_0"]["linear"]["weight"]
    assert isinstance(block_weight, nn.Partitioned)
    assert block_weight.names == ("model", None)
    optim = optax.adam(1e-2)

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            out, updates = WithEquinoxBlock().apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((out - y) ** 2), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    single = (params, batch_stats, optim.init(params))
    single_step = jax.jit(step)
    for _ in range(STEPS):
        *single, loss = single_step(*single, x, y)

    mesh = mesh_of(mesh_shape)
    carry = (params, batch_stats, optim.init(params))
    specs = nn.get_partition_spec(carry)  # Flax's own recipe
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        specs,
        is_leaf=lambda s: isinstance(s, P),
    )
    batch = NamedSharding(mesh, P("data"))
    carry = jax.device_put(carry, shardings)
    x_s, y_s = jax.device_put((x, y), batch)
    with mesh:
        sharded_step = jax.jit(
            step,
            in_shardings=(*shardings, batch, batch),
            out_shardings=(*shardings, NamedSharding(mesh, P())),
        )
        with jax.transfer_guard("disallow"):
            for _ in range(STEPS):
                *carry, loss_s = sharded_step(*carry, x_s, y_s)

    chex.assert_trees_all_close(
        nn.meta.unbox(carry[0]), nn.meta.unbox(single[0]), **TOL
    )
    chex.assert_trees_all_close(carry[1], single[1], **TOL)
    chex.assert_trees_all_close(loss_s, loss, **TOL)
    weight = carry[0]["ToLinen_0"]["linear"]["weight"].value
    assert spec_of(weight) == P("model", None)
    assert weight.addressable_shards[0].data.shape == (16 // mesh.shape["model"], 16)
    print(f"ok equinox-in-linen mesh={mesh_shape}")


CHECKS = [
    lambda: check_linen_in_equinox((8, 1)),  # data parallel
    lambda: check_linen_in_equinox((2, 4)),  # data + model parallel
    check_sharded_init,
    lambda: check_equinox_in_linen((8, 1)),
    lambda: check_equinox_in_linen((2, 4)),
]


def main() -> int:
    assert jax.device_count() == 8, f"expected 8 devices, got {jax.device_count()}"
    failed = 0
    for check in CHECKS:
        try:
            check()
        except Exception as err:  # report every failing check, then fail
            failed += 1
            print(f"FAILED: {type(err).__name__}: {err}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
