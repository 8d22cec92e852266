"""How the wrappers print: the wrapped module, then each collection with its shapes
and dtypes, in Equinox's pretty-printer and in treescope. The expected text of every
collection is Equinox's own printing of the native variables."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import adapters


def squash(text: str) -> str:
    """Layout-free text: the pretty-printer breaks lines by width."""
    return "".join(text.split())


class Net(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.width, param_dtype=jnp.bfloat16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


@pytest.fixture
def wrapped():
    module = Net(width=5)
    x = jnp.zeros((4, 3))
    # Keys in JAX's (sorted) pytree order, which the model's dicts have.
    native = jax.tree.map(lambda a: a, module.init(jax.random.key(0), x))
    model, state = adapters.to_equinox(
        module, x, key=jax.random.key(0), train_kwarg="train"
    )
    return module, native, model, state


def test_to_equinox_repr_shows_module_and_every_collection(wrapped):
    module, native, model, _ = wrapped
    text = squash(repr(model))
    assert text.startswith("ToEquinox(")
    assert squash("linen_module=" + eqx.tree_pformat(module)) in text
    assert "linen_module=Net(width=5)" in text
    # Trainable collections, as Equinox prints the native linen params...
    params = eqx.tree_pformat(native["params"])
    assert squash(f"variables={{'params':{params}}}") in text
    # ...every other collection's state index with its shapes and dtypes (the arrays
    # are in the state, so only their shapes are known to the model).
    stats = eqx.tree_pformat(native["batch_stats"])
    assert squash(f"state_indices={{'batch_stats':StateIndex({stats})}}") in text
    assert "bf16[3,5]" in text  # dtypes are kept, bfloat16 included
    assert squash("train_kwarg='train'") in text
    assert "rng_streams=('dropout',)" in text
    # Every name shown is an attribute, so what a user reads is what they type.
    for name, _ in model._display_fields():
        assert hasattr(model, name), name


def test_repr_nested_in_an_equinox_model(wrapped):
    _, native, model, _ = wrapped

    class Classifier(eqx.Module):
        backbone: adapters.ToEquinox
        head: eqx.nn.Linear

    outer = Classifier(model, eqx.nn.Linear(2, 1, key=jax.random.key(1)))
    text = squash(repr(outer))
    assert squash("backbone=ToEquinox(linen_module=Net(width=5)") in text
    assert squash(eqx.tree_pformat(native["batch_stats"])) in text
    assert squash("head=Linear(") in text
    assert text == squash(eqx.tree_pformat(outer))  # eqx.tree_pprint agrees


def test_nnx_repr():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, rngs=rngs)

    module = Block(nnx.Rngs(0))
    model, _ = adapters.to_equinox(module)
    text = squash(repr(model))
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    rest = nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))
    assert text.startswith(squash("NNXToEquinox(nnx_module=Block(...)"))
    assert squash("variables=" + eqx.tree_pformat(params)) in text
    assert squash("state_index=StateIndex(" + eqx.tree_pformat(rest) + ")") in text
    assert hasattr(model, "variables") and hasattr(model, "state_index")


def test_to_linen_repr_shows_model_and_collections():
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 4, key=jax.random.key(0)),
            eqx.nn.BatchNorm(4, "batch", mode="batch"),
        ]
    )
    module, variables = adapters.to_linen(model, state, vmap_axis=0, axis_name="batch")
    text = squash(repr(module))
    assert text.startswith(squash("ToLinen(model=" + eqx.tree_pformat(model)))
    # The linen variables the model becomes, as `to_linen` returns them.
    assert squash("variables=" + eqx.tree_pformat(variables)) in text
    assert squash("vmap_axis=0, axis_name='batch'") in text
    # Built from a factory, the model exists only at init: the repr shows the factory.
    factory = adapters.ToLinen(make=lambda key: eqx.nn.Linear(2, 2, key=key))
    assert squash(repr(factory)).startswith("ToLinen(make=<function")
    # A repr never raises: a stateful model given without its state prints without
    # its collections (init reports the missing state).
    bn = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch")[0]
    assert squash(repr(adapters.ToLinen(model=bn))).startswith(
        "ToLinen(model=BatchNorm("
    )


def test_treescope_renders_the_wrappers(wrapped):
    import treescope  # in the test extra: wrappers render in it when installed

    _, native, model, _ = wrapped
    text = treescope.render_to_text(model)
    assert text.startswith("ToEquinox(")
    for name in (
        "linen_module=Net(",
        "variables={",
        "'params':",
        "state_indices={",
        "'batch_stats': StateIndex(",
        "'mean': f32[5]",
    ):
        assert name in text, name
    # The trainable arrays are the real ones (treescope summarises their values).
    assert "bfloat16(3, 5)" in text

    module, _ = adapters.to_linen(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
    text = treescope.render_to_text(module)
    assert text.startswith("ToLinen(") and "variables={" in text and "'weight':" in text
