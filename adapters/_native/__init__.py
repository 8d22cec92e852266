"""Native migration: linen layers converted to real Equinox layers with their
weights, and back, through a public registry of converter pairs. One family of
layers a file; importing a family registers its pairs."""

from . import (  # noqa: F401  (registers each family's converters)
    _attention,
    _conv,
    _dense,
    _dropout,
    _normalisation,
    _recurrent,
    _sequential,
)
from ._batch_norm import LinenBatchNorm as LinenBatchNorm
from ._registry import (
    from_native as from_native,
    register_converter as register_converter,
    to_native as to_native,
)
