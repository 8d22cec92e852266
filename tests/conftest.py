import random

import jax
import jax.random as jr
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh, reproducible JAX key on every call: `key = getkey()`."""
    seed = random.Random(0)

    def _getkey():
        return jr.key(seed.randint(0, 2**31 - 1))

    return _getkey
