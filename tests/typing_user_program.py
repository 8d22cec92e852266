"""A small user program on the public API, for the type checker.

`tests/test_packaging.py` copies this file into a temporary directory and runs
`mypy --strict` on it, as a user's project would see the package (its `py.typed`
honoured, its internals not checked): it must type-check cleanly. The same test then
makes two deliberate mistakes in a copy (an attribute typo on a `ToEquinox` and a
misspelt keyword-only argument of `adapters.to_linen`) and asserts that mypy names
both lines. It is a correct program, too: `python tests/typing_user_program.py`.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, PyTree

import adapters
import adapters.testing


class Net(nn.Module):
    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dense(2)(nn.Dropout(0.1, deterministic=not train)(x))


class EqxNet(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key: Array) -> None:
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")

    def __call__(self, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        return self.norm(self.linear(x), state)


def linen_inside_equinox(x: Array) -> dict[str, PyTree]:
    model, state = adapters.to_equinox(
        Net(), x, key=jax.random.key(0), train_kwarg="train"
    )
    wrapped: adapters.ToEquinox = model
    trainable: dict[str, PyTree] = wrapped.variables
    assert set(trainable) == {"params"}
    out, state = model(x, state, key=jax.random.key(1))
    out, _ = eqx.nn.inference_mode(model)(x, state)
    assert out.shape == (x.shape[0], 2)
    rngs: dict[str, Array] = adapters.linen_rngs(jax.random.key(2), ("dropout",))
    assert set(rngs) == {"dropout"}
    return model.linen_variables(state)


def equinox_inside_linen(x: Array) -> None:
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(3))
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    linen_module: adapters.ToLinen = module
    out, updates = linen_module.apply(variables, x, mutable=["batch_stats"])
    model2, state2 = module.equinox_model({**variables, **updates})
    assert isinstance(model2, EqxNet) and state2 is not None


def equinox_inside_nnx(x: Array) -> None:
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(4))
    module: adapters.EquinoxToNNX = adapters.to_nnx(
        model, state, vmap_axis=0, axis_name="batch"
    )
    y = module(x)
    assert y.shape == (x.shape[0], 4)
    module.eval()
    module.train()
    model2, state2 = module.equinox_model()
    assert isinstance(model2, EqxNet) and state2 is not None
    same: adapters.EquinoxToNNX = adapters.EquinoxToNNX(model, state, vmap_axis=0)
    assert isinstance(same, nnx.Module)


def nnx_inside_equinox(x: Array) -> None:
    linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    adapters.nnx_reseed(linear, jax.random.key(5))
    wrapped = adapters.NNXToEquinox(linear)
    back: nnx.Module = wrapped.nnx_module(eqx.nn.State(wrapped))
    assert isinstance(back, nnx.Linear)


def checked_against_linen(x: Array) -> None:
    dense = nn.Dense(2)
    variables = dense.init(jax.random.key(6), x)
    model, state = adapters.to_equinox(dense, x, variables=variables)
    adapters.testing.assert_equivalent(dense, variables, model, state, x, steps=1)


def native(x: Array) -> None:
    dense = nn.Dense(2)
    variables = dense.init(jax.random.key(7), x)
    layer, state = adapters.to_native(dense, variables)
    back, back_variables = adapters.from_native(layer, state)
    assert isinstance(back, nn.Dense) and set(back_variables) == {"params"}
    try:
        adapters.to_native(dense, {})
    except adapters.AdapterError as e:
        message: str = str(e)
        assert message


def main() -> None:
    version: str = adapters.__version__
    assert version
    x = jnp.ones((4, 3))
    variables = linen_inside_equinox(x)
    assert "batch_stats" in variables
    equinox_inside_linen(x)
    equinox_inside_nnx(x)
    nnx_inside_equinox(x)
    checked_against_linen(x)
    native(x)


if __name__ == "__main__":
    main()
