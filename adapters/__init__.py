"""Flax linen and Equinox models in one codebase, under one explicit state-passing
convention."""

from importlib import metadata as _metadata

from . import testing as testing
from ._errors import AdapterError as AdapterError
from ._native import (
    from_native as from_native,
    LinenBatchNorm as LinenBatchNorm,
    register_converter as register_converter,
    to_native as to_native,
)
from ._nnx import NNXToEquinox as NNXToEquinox
from ._nnx_rngs import nnx_reseed as nnx_reseed
from ._sharding import (
    named_shardings as named_shardings,
    partition_specs as partition_specs,
)
from ._to_equinox import to_equinox as to_equinox, ToEquinox as ToEquinox
from ._to_linen import to_linen as to_linen, ToLinen as ToLinen
from ._to_nnx import EquinoxToNNX as EquinoxToNNX, to_nnx as to_nnx
from ._variables import linen_rngs as linen_rngs


__all__ = [
    "AdapterError",
    "EquinoxToNNX",
    "LinenBatchNorm",
    "NNXToEquinox",
    "ToEquinox",
    "ToLinen",
    "from_native",
    "linen_rngs",
    "named_shardings",
    "nnx_reseed",
    "partition_specs",
    "register_converter",
    "testing",
    "to_equinox",
    "to_linen",
    "to_native",
    "to_nnx",
]
# One source of truth: the version in pyproject.toml, as installed.
try:
    __version__ = _metadata.version("flax-equinox-adapters")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
