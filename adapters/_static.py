"""Static data of an `eqx.Module` that may not be hashable."""

from typing import Any


class Static:
    """Holds a linen module (or an NNX graph definition) as static data of an
    `eqx.Module`.

    Linen modules hash by value, except those holding a list or another unhashable
    attribute (`nn.Sequential` among them): those hash by identity instead, so that
    `eqx.filter_jit` still caches on them. The hash is computed once.
    """

    __slots__ = ("value", "_hash", "_by_value")

    def __init__(self, value: Any):
        self.value = value
        try:
            self._hash, self._by_value = hash(value), True
        except TypeError:
            self._hash, self._by_value = id(value), False

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Static):
            return NotImplemented
        if self.value is other.value:
            return True
        return (
            self._by_value
            and other._by_value
            and self._hash == other._hash
            and bool(self.value == other.value)
        )

    def __repr__(self) -> str:
        return type(self.value).__name__ + "(...)"
