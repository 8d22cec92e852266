"""Static data of an `eqx.Module` that may not be hashable."""

import dataclasses
from typing import Any

import flax.linen as nn
from flax.core import FrozenDict


class _ByIdentity(Exception):
    """Raised inside `_key` for a value that has no value-based key."""


def _key(value: Any, active: set[int]) -> Any:
    """A hashable key that is equal for equal values, built from the value's
    contents: a linen module by its type and its compared dataclass fields (the
    fields linen's own `==` compares, `parent` and `name` included); lists,
    tuples, dicts and FrozenDicts by their elements in order; floats by their
    exact bits (`0.0` and `-0.0` differ); other hashable values by themselves,
    next to their type (so that `1`, `1.0` and `True` differ, as they may in a
    computation). Raises `_ByIdentity` for anything else (a numpy or JAX array, a
    module bound to variables, a cycle): those must not be compared by value."""
    if isinstance(value, nn.Module):
        if value.scope is not None:  # its result depends on its variables
            raise _ByIdentity
        return _container_key(
            value,
            active,
            lambda: tuple(
                (field.name, _key(getattr(value, field.name), active))
                for field in dataclasses.fields(value)
                if field.compare
            ),
        )
    if type(value) in (list, tuple):
        return _container_key(
            value, active, lambda: tuple(_key(item, active) for item in value)
        )
    if type(value) in (dict, FrozenDict):  # linen turns dict fields into FrozenDicts
        return _container_key(
            value,
            active,
            lambda: tuple((_key(k, active), _key(v, active)) for k, v in value.items()),
        )
    if type(value) is float:
        return (float, value.hex())
    try:
        hash(value)
    except TypeError:
        raise _ByIdentity from None
    return (type(value), value)


def _container_key(value: Any, active: set[int], contents: Any) -> Any:
    """`(type(value), contents())`, refusing a cycle: `active` holds the ids of the
    containers being keyed further up."""
    if id(value) in active:
        raise _ByIdentity
    active.add(id(value))
    try:
        return (type(value), contents())
    finally:
        active.discard(id(value))


class Static:
    """Holds a linen module (or an NNX graph definition) as static data of an
    `eqx.Module`.

    Compared by value: two separately built but identical linen modules are equal
    and hash alike, those holding lists (`nn.Sequential` among them) included, so
    that `eqx.filter_jit` does not retrace for a rebuilt wrapper. The key is built
    once, from the module's dataclass fields (see `_key`). A value holding
    something that has no value-based key (an array, a bound module) is compared
    by identity instead: it may cost a retrace, never a wrong equality.
    """

    __slots__ = ("value", "_key", "_hash")

    def __init__(self, value: Any):
        self.value = value
        try:
            self._key: Any = _key(value, set())
            self._hash = hash(self._key)
        except (_ByIdentity, TypeError):  # TypeError: an element's own `__hash__`
            self._key, self._hash = None, id(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Static):
            return NotImplemented
        if self.value is other.value:
            return True
        if self._key is None or other._key is None or self._hash != other._hash:
            return False
        try:
            return bool(self._key == other._key)
        except Exception:  # an element whose `==` is not a truth value
            return False

    def __repr__(self) -> str:
        return type(self.value).__name__ + "(...)"
