"""Flax linen and Equinox models in one codebase, under one explicit state-passing
convention."""

from ._errors import AdapterError as AdapterError
from ._to_equinox import to_equinox as to_equinox, ToEquinox as ToEquinox
from ._variables import linen_rngs as linen_rngs


__all__ = ["AdapterError", "ToEquinox", "linen_rngs", "to_equinox"]
__version__ = "0.1.0"
