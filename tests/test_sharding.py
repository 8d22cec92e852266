"""Partitioning metadata across the boundary; sharded training on 8 CPU devices."""

import pathlib
import subprocess
import sys

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _processes import xla_env
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import adapters


HERE = pathlib.Path(__file__).parent


def test_sharded_training_on_eight_devices():
    """Data-parallel and data+model-parallel training through both wrappers equals
    one-device training, with the arrays sharded as specified (see
    `multidevice_checks.py`; a fresh process, as the device count is fixed when JAX
    starts)."""
    result = subprocess.run(
        [sys.executable, str(HERE / "multidevice_checks.py")],
        env=xla_env(8, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed, 0 failed" in result.stdout, result.stdout


init = nn.initializers.lecun_normal()


class Partitioned(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(
            8, use_bias=False, kernel_init=nn.with_partitioning(init, (None, "model"))
        )(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(
            2, kernel_init=nn.with_logical_partitioning(init, ("hidden", "out"))
        )(x)


def _mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


def test_partition_specs_from_linen_metadata(getkey):
    x = jnp.ones((4, 3))
    model, state = adapters.to_equinox(
        Partitioned(), x, key=getkey(), train_kwarg="train"
    )
    rules = (("hidden", "model"), ("out", None))
    specs = adapters.partition_specs((model, state), rules=rules)
    model_specs, state_specs = specs
    params = model_specs.variables["params"]
    assert params["Dense_0"]["kernel"].value == P(None, "model")
    assert params["Dense_1"]["kernel"].value == P("model", None)  # via the rules
    assert params["Dense_1"]["bias"] == P()
    assert params["BatchNorm_0"]["scale"] == P()
    # Same structure as the arrays of Equinox's partition pattern.
    arrays = eqx.filter((model, state), eqx.is_array)
    assert jax.tree.structure(
        specs, is_leaf=lambda s: isinstance(s, P)
    ) == jax.tree.structure(arrays)
    # The state's entries are specs too, under the same indices.
    bn = state_specs.get(model.state_indices["batch_stats"])["BatchNorm_0"]
    assert bn["mean"] == P()


def test_logical_rules_from_context(getkey):
    x = jnp.ones((4, 3))
    model, _ = adapters.to_equinox(Partitioned(), x, key=getkey(), train_kwarg="train")
    with nn.logical_axis_rules((("hidden", "data"), ("out", None))):
        specs = adapters.partition_specs(model)
    assert specs.variables["params"]["Dense_1"]["kernel"].value == P("data", None)
    # Native linen agrees on the mapping.
    native = nn.logical_to_mesh_axes(("hidden", "out"), (("hidden", "data"),))
    assert specs.variables["params"]["Dense_1"]["kernel"].value == native


def test_named_shardings_place_arrays(getkey):
    x = jnp.ones((4, 3))
    model, state = adapters.to_equinox(
        Partitioned(), x, key=getkey(), train_kwarg="train"
    )
    mesh = _mesh()
    arrays = eqx.filter((model, state), eqx.is_array)
    shardings = adapters.named_shardings(arrays, mesh, rules=(("hidden", "model"),))
    placed = jax.device_put(arrays, shardings)
    kernel = placed[0].variables["params"]["Dense_0"]["kernel"].value
    assert kernel.sharding == NamedSharding(mesh, P(None, "model"))
    chex.assert_trees_all_equal(placed, arrays)


def test_named_shardings_unknown_axis(getkey):
    x = jnp.ones((4, 3))
    model, _ = adapters.to_equinox(Partitioned(), x, key=getkey(), train_kwarg="train")
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(adapters.AdapterError, match="mesh axis 'model'") as info:
        adapters.named_shardings(model, mesh)
    # Which array's spec, by path.
    assert "'variables/params/Dense_0/kernel/value'" in str(info.value)


def test_to_linen_partition_function(getkey):
    mlp = eqx.nn.MLP(3, 2, 8, 1, key=getkey())

    def partition(path, shape):
        return ("model", None) if path[-1] == "weight" else None

    module, variables = adapters.to_linen(mlp, partition=partition)
    weight = variables["params"]["layers"]["0"]["weight"]
    assert isinstance(weight, nn.Partitioned)
    assert weight.names == ("model", None)
    assert weight.value is mlp.layers[0].weight  # boxed, not copied
    assert not isinstance(variables["params"]["layers"]["0"]["bias"], nn.Partitioned)
    specs = nn.get_partition_spec(variables)  # Flax's own recipe works
    assert specs["params"]["layers"]["1"]["weight"] == P("model", None)
    assert specs["params"]["layers"]["1"]["bias"] == P()
    x = jnp.ones(3)
    chex.assert_trees_all_equal(module.apply(variables, x), mlp(x))
    back, _ = module.equinox_model(variables)
    chex.assert_trees_all_equal(back, mlp)


def test_to_linen_partition_pytree(getkey):
    linear = eqx.nn.Linear(3, 4, key=getkey())
    partition = {"weight": P("model")}  # shorter than the rank: rest replicated
    module, variables = adapters.to_linen(linear, partition=partition)
    assert variables["params"]["weight"].names == ("model", None)
    # A pytree shaped like the model works too.
    like_model = eqx.tree_at(
        lambda m: m.weight,
        jax.tree.map(lambda _: None, linear),
        P(None, "model"),
        is_leaf=lambda x: x is None,
    )
    _, variables = adapters.to_linen(linear, partition=like_model)
    assert variables["params"]["weight"].names == (None, "model")


def test_factory_partition_boxes_at_init(getkey):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return adapters.ToLinen(
                make=lambda k: eqx.nn.Linear(3, 4, key=k),
                partition=lambda path, shape: (
                    ("model", None) if path == ("weight",) else None
                ),
            )(x)

    x = jnp.ones(3)
    variables = Net().init(getkey(), x)
    box = variables["params"]["ToLinen_0"]["weight"]
    assert isinstance(box, nn.Partitioned) and box.names == ("model", None)
    native = eqx.nn.Linear(3, 4, key=jr.key(0))
    native = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        native,
        (box.value, variables["params"]["ToLinen_0"]["bias"]),
    )
    chex.assert_trees_all_equal(Net().apply(variables, x), native(x))


def test_partition_errors(getkey):
    linear = eqx.nn.Linear(3, 4, key=getkey())
    with pytest.raises(adapters.AdapterError, match="more entries than the array") as e:
        adapters.to_linen(linear, partition=lambda p, s: ("a", "b", "c"))
    assert "one entry (a mesh axis name or `None`) per array axis" in str(e.value)
    with pytest.raises(TypeError, match="PartitionSpec"):
        adapters.to_linen(linear, partition=lambda p, s: "model")
    with pytest.raises(TypeError, match="weight"):
        adapters.to_linen(linear, partition={"weight": 3})
