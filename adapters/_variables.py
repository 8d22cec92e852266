"""Linen variable collections and their abstract specs: naming, checking, splitting.

Both wrapper directions stand on this module. A linen variables dict is
`{collection: nested dict of arrays}`; arrays may sit inside `flax.linen`
partitioning boxes (`nn.Partitioned`, `nn.LogicallyPartitioned`), which are kept
as they are, never unboxed.
"""

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from flax.core import FrozenDict, meta
from jaxtyping import PRNGKeyArray, PyTree

from ._errors import AdapterError, AdapterTypeError


def linen_rngs(
    key: PRNGKeyArray, streams: str | Sequence[str] = ("dropout",)
) -> dict[str, PRNGKeyArray]:
    """Derives one key per linen rng stream from a single JAX key.

    This is how [`adapters.ToEquinox`][] turns the `key=` of a call into linen's
    `rngs=`; call it yourself to reproduce a wrapped call with linen's own `apply`.
    Each stream's key is `jax.random.fold_in(key, crc32(name) & 0x7fffffff)`, so a
    stream's key depends only on `key` and its own name: declaring another stream
    does not change the keys of the others.

    !!! Example

        ```python
        out = module.apply(variables, x, rngs=adapters.linen_rngs(key, ("dropout",)))
        ```

    **Arguments:**

    - `key`: a JAX PRNG key, new-style (`jax.random.key`) or raw (`PRNGKey`).
    - `streams`: the linen rng stream names, e.g. `("dropout",)`.

    **Returns:**

    A dict `{stream: key}`, ready to pass as linen's `rngs=`.

    **Raises:**

    [`adapters.AdapterError`][] if a stream name is repeated.
    """
    check_key(key, "`adapters.linen_rngs`'s `key`")
    streams = normalise_names(streams, "streams")
    return {
        s: jax.random.fold_in(key, zlib.crc32(s.encode()) & 0x7FFFFFFF) for s in streams
    }


def check_key(key: Any, where: str) -> None:
    """Refuses anything but one JAX key: a typed key (`jax.random.key`) of shape
    `()`, or a legacy raw key (`jax.random.PRNGKey`), `uint32[2]`."""
    if isinstance(key, (jax.Array, np.ndarray)):
        shape, dtype = tuple(key.shape), key.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if shape == ():
                return
            got = f"a batch of keys, {dtype}[{','.join(map(str, shape))}]"
        elif dtype == jnp.uint32 and shape == (2,):
            return
        else:
            got = f"an array {np.dtype(dtype)}[{','.join(map(str, shape))}]"
    else:
        got = f"{type(key).__name__} {key!r}"
    raise AdapterTypeError(
        f"{where} must be one JAX PRNG key, `jax.random.key(seed)` (or a legacy "
        f"`jax.random.PRNGKey(seed)`, uint32[2]), but got {got}. For a batch of "
        "keys, one per example, map the call with `jax.vmap` (`in_axes` 0 for the "
        "keys) so that each call gets one key."
    )


def normalise_names(names: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    """`None`, one name or a sequence of names, as a tuple of unique strings."""
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    if not isinstance(names, Iterable) or isinstance(names, Mapping):
        raise AdapterTypeError(
            f"`{what}` takes a name or a sequence of names (strings), e.g. "
            f"`{what}=('dropout',)`, but got {names!r} of type "
            f"{type(names).__name__}."
        )
    names = tuple(names)
    for name in names:
        if not isinstance(name, str):
            raise AdapterTypeError(
                f"`{what}` must be names (strings), but got {name!r} of type "
                f"{type(name).__name__} in {names!r}."
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdapterError(
            f"`{what}` names {', '.join(map(repr, repeated))} more than once: "
            f"{names!r}. Give each name once."
        )
    return names


def is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _plain(tree: Any) -> Any:
    """Turns `FrozenDict`s (at any depth) into dicts; leaves and boxes untouched."""
    if isinstance(tree, Mapping) and not is_box(tree):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def as_collections(variables: Any, where: str) -> dict[str, PyTree]:
    """Checks that `variables` is linen's `{collection: tree}` and returns it as a
    plain dict of plain dicts, with the very same leaves (no buffer is copied)."""
    if not isinstance(variables, Mapping):
        raise AdapterTypeError(
            f"{where}: expected linen variables, a mapping `{{collection: tree}}` such "
            f"as `module.init(...)` returns, but got {type(variables).__name__}. If "
            "you have only the parameters, pass `variables={'params': params}`."
        )
    out = {}
    for name, tree in variables.items():
        if not isinstance(name, str):
            raise AdapterTypeError(
                f"{where}: collection names must be strings, got {name!r}."
            )
        if not isinstance(tree, (Mapping, FrozenDict)):
            raise AdapterTypeError(
                f"{where}: collection {name!r} must be a nested mapping of arrays, "
                f"but got {type(tree).__name__}. Linen variables look like "
                "`{'params': {'Dense_0': {'kernel': ...}}}`."
            )
        out[name] = _plain(tree)
    return out


def path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A JAX key path as string keys: `.layers[0].weight` -> `("layers", "0",
    "weight")`, the names linen's nested dicts use."""
    parts = []
    for entry in path:
        if isinstance(entry, jtu.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jtu.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jtu.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jtu.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return tuple(parts)


def path_str(path: tuple[Any, ...]) -> str:
    """A key path as linen writes it: `Dense_0/kernel`."""
    return show_path(path_keys(path))


def show_path(keys: tuple[str, ...]) -> str:
    """String keys as one unambiguous path: `Dense_0/kernel`, with a key that holds
    a `/` itself quoted (`'a/b'/kernel`), so that it cannot read as two keys."""
    return "/".join(repr(k) if "/" in k or not k else k for k in keys)


def _dtype(dtype: Any) -> Any:
    """A numpy dtype, or JAX's own for typed PRNG keys (`key<fry>`)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return np.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Shape and dtype of one variable, without its value."""

    shape: tuple[int, ...]
    dtype: Any

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


def abstract_leaf(x: Any, where: str) -> Leaf:
    if is_box(x):
        inner = jtu.tree_leaves(x)
        if len(inner) != 1:
            raise AdapterTypeError(
                f"{where}: a partitioning box must hold one array, but this "
                f"{type(x).__name__} holds {len(inner)} leaves. Use one box per "
                "array, e.g. `nn.Partitioned(kernel, names=(None, 'model'))`."
            )
        x = inner[0]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return Leaf(tuple(x.shape), _dtype(x.dtype))
    if isinstance(x, (bool, int, float, complex)):
        try:
            return Leaf((), np.dtype(jnp.asarray(x).dtype))
        except OverflowError as err:
            raise AdapterError(
                f"{where}: the Python int {x} does not fit a JAX integer array "
                f"({err}). Store it as a numpy array of a wide enough dtype (with "
                "64-bit mode enabled for more than 32 bits)."
            ) from None
    raise AdapterTypeError(
        f"{where}: expected an array, got {type(x).__name__} ({x!r}). The adapters "
        "carry variables that hold arrays (or Python scalars)."
    )


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """The shape of a collection: its tree structure and every leaf's shape/dtype,
    by path (a tuple of string keys, so that a key `"a/b"` and the nested keys
    `a`, `b` stay two paths). Hashable, so it can be a static field of an
    `eqx.Module`."""

    treedef: Any
    leaves: tuple[tuple[tuple[str, ...], Leaf], ...]
    boxed: frozenset[tuple[str, ...]] = frozenset()  # paths of partitioning boxes

    @classmethod
    def of(cls, tree: PyTree, where: str) -> "TreeSpec":
        treedef = jtu.tree_structure(tree)
        flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_box)
        leaves, boxed = [], set()
        for path, leaf in flat:
            keys = path_keys(path)
            leaves.append((keys, abstract_leaf(leaf, f"{where}/{show_path(keys)}")))
            if is_box(leaf):
                boxed.add(keys)
        return cls(treedef, tuple(leaves), frozenset(boxed))

    def describe(self) -> str:
        return ", ".join(f"{show_path(p)}: {leaf}" for p, leaf in self.leaves) or (
            "empty"
        )


_NARROWED = """\
Variable {where} is {leaf}, but JAX runs in 32-bit mode, so as a JAX array it
would be {stored} and the dtype would be lost. Enable 64-bit mode
(`jax.config.update("jax_enable_x64", True)`) before building the model, or cast the
variables to {stored} yourself.\
"""

_ABSTRACT = """\
Variable {where} is a `jax.ShapeDtypeStruct` ({leaf}), the shape of an array
without its values, as `jax.eval_shape` or an abstract checkpoint target gives. The
adapters wrap arrays: restore the values first (e.g. orbax's
`checkpointer.restore(path, abstract_variables)`), or initialise with example
arguments and `key=` instead of `variables=`.\
"""


def narrowing_problems(spec: "TreeSpec", collection: str) -> list[str]:
    """The messages for leaves whose dtype JAX would narrow (float64 in 32-bit
    mode), one a leaf."""
    problems = []
    for path, leaf in spec.leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
            continue  # typed PRNG keys
        stored = jax.dtypes.canonicalize_dtype(leaf.dtype)
        if stored != leaf.dtype:
            where = f"{collection}/{show_path(path)}"
            problems.append(_NARROWED.format(where=where, leaf=leaf, stored=stored))
    return problems


def as_jax_arrays(tree: PyTree, spec: "TreeSpec", collection: str) -> PyTree:
    """The tree with numpy leaves and Python scalars as JAX arrays (JAX arrays are
    kept, never copied), so that Equinox's filters (`eqx.is_inexact_array`) and
    optax see every array; refuses a dtype that JAX would narrow (float64 in 32-bit
    mode) and abstract arrays.

    Python scalars become what `jnp.asarray` makes of them, weakly typed, and
    weakly typed arrays stay weakly typed: linen computes with such a variable as it
    would with the scalar (a bfloat16 input times a weak float32 scalar stays
    bfloat16), so the wrapper must too."""
    problems = narrowing_problems(spec, collection)
    if problems:
        raise AdapterError(problems[0])

    def one(path, x):
        if isinstance(x, jax.ShapeDtypeStruct):
            where = f"{collection}/{path_str(path)}"
            leaf = Leaf(tuple(x.shape), _dtype(x.dtype))
            raise AdapterTypeError(_ABSTRACT.format(where=where, leaf=leaf))
        if isinstance(x, (np.ndarray, np.generic, bool, int, float, complex)):
            return jnp.asarray(x)
        return x

    return jtu.tree_map_with_path(one, tree)


def strong(tree: PyTree, scalars: bool = True) -> PyTree:
    """The tree with weakly typed arrays (made from Python scalars) strongly typed,
    dtype kept. With `scalars`, Python scalars become such arrays too."""

    def one(x):
        if scalars and isinstance(x, (bool, int, float, complex)):
            x = jnp.asarray(x)
        if getattr(x, "weak_type", False):
            return jnp.asarray(x, dtype=x.dtype)
        return x

    return jtu.tree_map(one, tree)


_OPENED_BOX = (
    "  {where}: a dict {{'value': {leaf}}} where the model has a partitioning box "
    "holding {leaf}"
)
OPENED_BOX_ADVICE = """\
A partitioning box (such as `nn.Partitioned`) saved and restored without a target
comes back as a dict {'value': array} (orbax, `flax.serialization`). Restore with a
target that has the boxes: orbax's `checkpointer.restore(path, abstract)` with
`abstract = jax.eval_shape(lambda: model.linen_variables(state))` for a
`ToEquinox`, or `jax.eval_shape(module.init, key, x)` for a linen module (and
shardings from `adapters.named_shardings` for a mesh).\
"""


def spec_problems(
    expected: TreeSpec,
    got: TreeSpec,
    collection: str,
    extra: str = "unexpected entry that the module does not have",
) -> list[str]:
    """One line per missing, extra, mis-shaped or mis-typed entry; empty if the two
    specs agree (same tree structure, same shapes and dtypes)."""
    want = dict(expected.leaves)
    have = dict(got.leaves)
    problems = []
    opened = set()  # boxes given back as `{"value": array}` dicts
    for path, leaf in want.items():
        where = f"{collection}/{show_path(path)}"
        opened_box = path in expected.boxed and have.get((*path, "value")) == leaf
        if path not in have and opened_box:
            opened.add((*path, "value"))
            problems.append(_OPENED_BOX.format(where=where, leaf=leaf))
        elif path not in have:
            problems.append(f"  {where}: missing (expected {leaf})")
        elif have[path] != leaf:
            problems.append(f"  {where}: expected {leaf}, got {have[path]}")
    for path, leaf in have.items():
        if path not in want and path not in opened:
            problems.append(f"  {collection}/{show_path(path)}: {extra} ({leaf})")
    if opened:
        problems.append(OPENED_BOX_ADVICE)
    if not problems and expected.treedef != got.treedef:
        problems.append(
            f"  {collection}: same entries but a different tree structure (for "
            f"example a list or dict where the model has a tuple, as a checkpoint "
            f"restored without a target gives, or a partitioning box): expected "
            f"{expected.treedef}, got {got.treedef}"
        )
    return problems


def specs_problems(
    expected: Mapping[str, TreeSpec], got: Mapping[str, PyTree], where: str
) -> list[str]:
    """Compares a whole variables dict with the specs of its collections, collection
    by collection: one line per problem."""
    problems = []
    for name, spec in expected.items():
        if name not in got:
            problems.append(
                f"  {name}: missing collection (expected {spec.describe()})"
            )
    for name, tree in got.items():
        if name not in expected:
            problems.append(
                f"  {name}: unexpected collection that the module does not create"
            )
            continue
        problems += spec_problems(expected[name], TreeSpec.of(tree, where), name)
    if OPENED_BOX_ADVICE in problems:  # said once, after every entry it explains
        problems = [p for p in problems if p != OPENED_BOX_ADVICE]
        problems.append(OPENED_BOX_ADVICE)
    return problems


def variables_problems(
    expected: Mapping[str, PyTree],
    got: Mapping[str, PyTree],
    where: str,
    boxed: Mapping[str, PyTree] | None = None,
) -> list[str]:
    """Compares whole variables dicts, collection by collection. `boxed`, the
    expected variables in the boxes the caller's were saved with, tells the report
    where a box restored as `{"value": array}` is to be named."""
    specs = {name: TreeSpec.of(tree, where) for name, tree in expected.items()}
    for name, tree in (boxed or {}).items():
        if name in specs:
            boxes = TreeSpec.of(tree, where).boxed
            specs[name] = dataclasses.replace(specs[name], boxed=boxes)
    return specs_problems(specs, got, where)


# Equinox model + state <-> linen variables. An Equinox model's inexact arrays become
# `params`, its other arrays a buffer collection, and each `eqx.nn.State` entry a
# state collection, every one named by its path in the model:
# `{"params": {"layers": {"0": {"weight": ...}}}}`.


def is_state_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def is_arraylike(x: Any) -> bool:
    """An array, or the shape of one (from `eqx.filter_eval_shape`)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def insert_at(tree: dict, keys: tuple[str, ...], value: Any, where: str) -> None:
    if not keys:
        raise AdapterTypeError(
            f"{where}: expected an Equinox module (or another pytree) holding arrays, "
            f"but got a bare {type(value).__name__}."
        )
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def lookup_at(tree: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def equinox_to_variables(
    model: PyTree,
    state: eqx.nn.State | None,
    state_collection: str,
    buffer_collection: str,
) -> dict[str, dict]:
    """An Equinox model and its state as a linen variables dict (the same arrays,
    nothing copied). Collections with nothing in them are left out, as linen's init
    leaves them out."""
    collections: dict[str, dict] = {"params": {}, buffer_collection: {}}
    collections[state_collection] = {}
    flat, _ = jtu.tree_flatten_with_path(model, is_leaf=is_state_index)
    for path, leaf in flat:
        keys = path_keys(path)
        where = "/".join(keys)
        if is_state_index(leaf):
            if state is None:
                raise AdapterError(
                    f"The Equinox model has state (an `eqx.nn.StateIndex` at "
                    f"{where!r}) but no `eqx.nn.State` was given. Build both with "
                    "`model, state = eqx.nn.make_with_state(Model)(...)` and pass "
                    "the state too."
                )
            try:
                value = state.get(leaf)
            except KeyError:
                raise AdapterError(
                    f"The `eqx.nn.State` does not hold the entry of the model's "
                    f"`eqx.nn.StateIndex` at {where!r}: it was made for another "
                    "model. Pass the state made together with this model."
                ) from None
            insert_at(collections[state_collection], keys, value, where)
        elif is_arraylike(leaf):
            inexact = jnp.issubdtype(leaf.dtype, jnp.inexact)
            name = "params" if inexact else buffer_collection
            insert_at(collections[name], keys, leaf, where)
    return {c: t for c, t in collections.items() if t}


def variables_to_equinox(
    skeleton: PyTree,
    skeleton_state: eqx.nn.State | None,
    variables: Mapping[str, PyTree],
    state_collection: str,
    buffer_collection: str,
    where: str,
    box: Any = None,
) -> tuple[PyTree, eqx.nn.State | None]:
    """The inverse of `equinox_to_variables`: puts the arrays of `variables` into
    the structure of `skeleton` (a model whose arrays may be
    `jax.ShapeDtypeStruct`s), after checking that every entry is there with its
    shape and dtype. `box` puts the expected variables in the partitioning boxes
    the caller's variables have (for the report's sake only)."""
    skeleton = eqx.nn.delete_init_state(skeleton)
    expected = equinox_to_variables(
        skeleton, skeleton_state, state_collection, buffer_collection
    )
    got = as_collections(variables, where)
    boxed = None if box is None else box(expected)
    problems = variables_problems(expected, got, where, boxed)
    if problems:
        raise AdapterError(
            f"{where} do not fit the Equinox model:\n"
            + "\n".join(problems)
            + "\nPass the variables made for this model (by `adapters.to_linen` or "
            "its linen `init`). Restore a checkpoint with a target, the abstract "
            "variables `adapters.to_linen(*eqx.filter_eval_shape(make_model))[1]`, "
            "so that it keeps the model's tree structure."
        )
    flat, treedef = jtu.tree_flatten_with_path(skeleton, is_leaf=is_state_index)
    leaves, markers, values = [], [], []
    for path, leaf in flat:
        keys = path_keys(path)
        if is_state_index(leaf):
            markers.append(leaf.marker)
            values.append(lookup_at(got[state_collection], keys))
        elif is_arraylike(leaf):
            inexact = jnp.issubdtype(leaf.dtype, jnp.inexact)
            leaf = lookup_at(got["params" if inexact else buffer_collection], keys)
        leaves.append(leaf)
    model = jtu.tree_unflatten(treedef, leaves)
    state = eqx.nn.State.tree_unflatten(tuple(markers), tuple(values))
    return model, state if markers else None
