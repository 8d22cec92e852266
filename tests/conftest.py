import os
import random

from _processes import CHEAP_COMPILE


# Every program the suite compiles, compiled cheaply (see _processes.py), set
# before JAX starts its backend; a user's own XLA_FLAGS are kept, before ours (the
# xdist workers inherit the controller's, already set).
_flags = os.environ.get("XLA_FLAGS", "")
if CHEAP_COMPILE not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {CHEAP_COMPILE}".strip()

import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


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
