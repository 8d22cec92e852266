import random

import jax.random as jr
import pytest


# JAX's default (standard) dtype promotion: optax's Adam, like much user code that
# the adapters must run, promotes a Python float against an int32 step count, which
# the "strict" mode refuses. Warnings are errors (pyproject.toml).


@pytest.fixture
def getkey():
    """A fresh, reproducible JAX key on every call: `key = getkey()`."""
    seed = random.Random(0)

    def _getkey():
        return jr.key(seed.randint(0, 2**31 - 1))

    return _getkey
