"""Sharding across the boundary: linen partitioning metadata as `PartitionSpec` /
`NamedSharding` pytrees for Equinox, and partition specs as linen boxes."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._errors import AdapterError, AdapterTypeError
from ._variables import is_arraylike, is_box, path_keys


Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
Partition = (
    Callable[[tuple[str, ...], tuple[int, ...]], PartitionSpec | Sequence | None]
    | PyTree
    | None
)


def _spec_of_box(box: Any, rules: Rules | None) -> PartitionSpec:
    spec = box.get_partition_spec()
    if isinstance(box, nn.LogicallyPartitioned):
        # Logical names -> mesh axes, with the given rules, the box's own, or the
        # ones set by `nn.logical_axis_rules(...)` around the call.
        rules = rules if rules is not None else (box.rules or None)
        spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    return PartitionSpec(*spec)


def partition_specs(tree: PyTree, rules: Rules | None = None) -> PyTree:
    """The `PartitionSpec` of every array of a pytree, from linen's partitioning
    metadata.

    Works on a [`adapters.ToEquinox`][] model, its `eqx.nn.State`, both as a tuple,
    or linen variables. An array inside an `nn.Partitioned` box gets the box's
    spec; inside an `nn.LogicallyPartitioned` box, its logical names mapped to mesh
    axes by `rules` (or the box's own rules, or those of an enclosing
    `nn.logical_axis_rules` context); an array without a box is replicated
    (`PartitionSpec()`). Non-array leaves become `None`.

    The result has the structure of `eqx.filter(tree, eqx.is_array)` (boxes kept,
    holding a spec), so it can be given to `jax.jit`'s `in_shardings` /
    `out_shardings` for the arrays of Equinox's partition pattern.

    !!! Example

        ```python
        specs = adapters.partition_specs((model, state))
        ```

    **Arguments:**

    - `tree`: the pytree (abstract `jax.ShapeDtypeStruct` leaves work too, e.g. from
        `eqx.filter_eval_shape`).
    - `rules`: logical axis rules, as for `nn.logical_to_mesh_axes`.

    **Returns:**

    A pytree of `PartitionSpec`s (and `None`s).
    """

    def spec(x):
        if is_box(x):
            return x.replace_boxed(_spec_of_box(x, rules))
        return PartitionSpec() if is_arraylike(x) else None

    return jtu.tree_map(spec, tree, is_leaf=is_box)


def named_shardings(tree: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
    """[`adapters.partition_specs`][] as `NamedSharding`s on `mesh`: ready for
    `jax.device_put(tree, shardings)` and for `jax.jit`'s `in_shardings` /
    `out_shardings`.

    **Arguments:**

    - `tree`: as for [`adapters.partition_specs`][].
    - `mesh`: a `jax.sharding.Mesh` whose axis names the specs use.
    - `rules`: logical axis rules.

    **Returns:**

    A pytree of `NamedSharding`s (and `None`s), structured as
    `eqx.filter(tree, eqx.is_array)`.
    """
    specs = partition_specs(tree, rules)
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    flat = jtu.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    for path, spec in flat:
        unknown = [a for a in _axes(spec) if a not in mesh.axis_names]
        if unknown:
            where = "/".join(path_keys(path))
            raise AdapterError(
                f"The partition spec {spec} of {where!r} names mesh axis "
                f"{unknown[0]!r}, but the mesh has axes {mesh.axis_names}. Build the "
                "mesh with that axis, or map the names with `rules=` (logical axis "
                "rules)."
            )
    return jtu.tree_map(
        lambda s: NamedSharding(mesh, s),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _axes(spec: PartitionSpec) -> list[str]:
    out = []
    for entry in spec:
        if entry is None:
            continue
        out += [entry] if isinstance(entry, str) else list(entry)
    return out


def _as_spec(value: Any, where: str) -> PartitionSpec | None:
    if value is None or isinstance(value, PartitionSpec):
        return value
    if isinstance(value, (tuple, list)):
        return PartitionSpec(*value)
    raise AdapterTypeError(
        f"The partition of {where!r} must be a `PartitionSpec`, a tuple of mesh axis "
        f"names (or `None`s), or `None`; got {type(value).__name__}."
    )


def box_variables(variables: Mapping[str, dict], partition: Partition) -> dict:
    """Puts the arrays of linen variables named in `partition` into
    `nn.Partitioned` boxes (the same arrays, no copy).

    `partition` is a function `(path, shape) -> spec or None`, where `path` is the
    array's path in the model as a tuple of names (`("layers", "0", "weight")`), or
    a pytree of `PartitionSpec`s shaped like the model (or like its `params`
    dict); arrays it does not name stay unboxed (replicated)."""
    if partition is None:
        return dict(variables)
    if callable(partition) and not isinstance(partition, (Mapping, eqx.Module)):
        lookup = partition
    else:
        flat, _ = jtu.tree_flatten_with_path(
            partition, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        by_path = {}
        for path, leaf in flat:
            if not isinstance(leaf, PartitionSpec):
                raise AdapterTypeError(
                    f"The partition pytree holds {leaf!r} at "
                    f"{'/'.join(path_keys(path))!r}; its leaves must be "
                    "`jax.sharding.PartitionSpec`s (use `None` for replicated)."
                )
            by_path[path_keys(path)] = leaf
        lookup = lambda path, shape: by_path.get(path)  # noqa: E731

    def box(path, x):
        if is_box(x):
            return x
        keys = path_keys(path)
        spec = _as_spec(lookup(keys, tuple(x.shape)), "/".join(keys))
        if spec is None:
            return x
        if len(spec) > x.ndim:
            raise AdapterError(
                f"The partition of {'/'.join(keys)!r} is {spec}, with more entries "
                f"than the array has axes (shape {tuple(x.shape)}). Give it one entry "
                "(a mesh axis name or `None`) per array axis at most, or `None` to "
                "replicate it."
            )
        names = tuple(spec) + (None,) * (x.ndim - len(spec))
        return nn.Partitioned(x, names)

    return {
        c: jtu.tree_map_with_path(box, tree, is_leaf=is_box)
        for c, tree in variables.items()
    }
