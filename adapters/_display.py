"""How the wrappers print: the wrapped module, then each collection with the shapes
and dtypes of its arrays, as Equinox prints a model (`repr`, `eqx.tree_pprint`),
and in treescope when it is installed.

A wrapper inherits `Displayed` and gives `_display_fields()`, a list of
`(name, value)` pairs, each name an attribute of the wrapper (so that what a user
reads is what they type); arrays print as `f32[3,4]`, and a state index as
`StateIndex({...})` with the shapes of what the `eqx.nn.State` holds at that index:
the arrays live in the state, not in the wrapper, so the shapes are built from the
wrapper's shape specs.
"""

from collections.abc import Iterable
from typing import Any

import equinox as eqx
import numpy as np


class Text:
    """Printed as its text, without quotes: a shape `f32[3,4]`, a type `Linear(...)`."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __pdoc__(self, **kwargs: Any) -> Any:
        import wadler_lindig as wl  # Equinox's pretty-printer

        return wl.TextDoc(self.text)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from treescope import rendering_parts

        return rendering_parts.build_one_line_tree_node(
            rendering_parts.text(self.text), path
        )


def shape(shape: tuple[int, ...], dtype: Any) -> Text:
    """An array's shape and dtype as Equinox prints an array: `f32[3,4]`."""
    name = str(dtype)
    if isinstance(dtype, np.dtype):
        for long, short in (("float", "f"), ("uint", "u"), ("int", "i")):
            name = name.replace(long, short)
        name = name.replace("complex", "c")
    return Text(f"{name}[{','.join(map(str, shape))}]")


def nested_shapes(leaves: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """`[(("Dense_0", "kernel"), leaf), ...]` (a leaf has `.shape` and `.dtype`) as
    nested dicts of shapes: `{"Dense_0": {"kernel": f32[3,4]}}`."""
    tree: dict[str, Any] = {}
    for path, leaf in leaves:
        *parents, last = path or ("",)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = shape(leaf.shape, leaf.dtype)
    return tree


class StateIndex:
    """An `eqx.nn.StateIndex` as the wrappers print it, `StateIndex({...})`, showing
    the shapes and dtypes of what `state.get(index)` returns, as the constructor
    `eqx.nn.StateIndex(init)` takes its initial value."""

    __slots__ = ("shapes",)

    def __init__(self, shapes: Any):
        self.shapes = shapes

    def __repr__(self) -> str:
        return f"StateIndex({self.shapes!r})"

    def __pdoc__(self, **kwargs: Any) -> Any:
        import wadler_lindig as wl

        return wl.bracketed(
            begin=wl.TextDoc("StateIndex("),
            docs=[wl.pdoc(self.shapes, **kwargs)],
            sep=wl.comma,
            end=wl.TextDoc(")"),
            indent=kwargs.get("indent", 2),
        )

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from treescope import rendering_parts

        # The shapes are no attribute of the index: no path to copy below it.
        return rendering_parts.build_foldable_tree_node_from_children(
            prefix="StateIndex(",
            children=[subtree_renderer(self.shapes, path=None)],
            suffix=")",
            path=path,
        )


class Displayed:
    """A mixin for the wrappers: `repr` (through Equinox's pretty-printer, so also
    `eqx.tree_pprint` and nesting in a larger model) and treescope show
    `self._display_fields()`, a list of `(name, value)` pairs."""

    def _display_fields(self) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return eqx.tree_pformat(self)

    def __pdoc__(self, **kwargs: Any) -> Any:
        """`Name(field=value, ...)`, laid out as Equinox lays out an `eqx.Module`."""
        import wadler_lindig as wl

        return wl.bracketed(
            begin=wl.TextDoc(type(self).__name__ + "("),
            docs=wl.named_objs(self._display_fields(), **kwargs),
            sep=wl.comma,
            end=wl.TextDoc(")"),
            indent=kwargs.get("indent", 2),
        )

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from treescope import repr_lib

        return repr_lib.render_object_constructor(
            type(self),
            dict(self._display_fields()),
            path,
            subtree_renderer,
            roundtrippable=False,
        )
