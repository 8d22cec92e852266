"""What the converters share: the checks of a layer's options and variables, and
the error for an option with no equivalent."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import dtypes as linen_dtypes

from .._errors import AdapterError
from ._registry import _at


_WRAP = (
    "Keep this layer wrapped with `adapters.ToEquinox` instead: it runs linen's own "
    "code, so every option works"
)
_KEEP = (
    "Keep this layer as it is, inside linen through `adapters.ToLinen`, instead "
    "of converting it"
)


def _show(option: str, value: Any) -> str:
    if option.endswith(("dtype", "element_type")) and value is not None:
        try:
            return f"jnp.{jnp.dtype(value).name}"
        except (TypeError, ValueError):
            pass
    return repr(value)


def unsupported(
    layer: str, option: str, value: Any, why: str, fix: str | None = None
) -> AdapterError:
    """The error for a layer option that the other library cannot compute: names
    the layer, the option and its value, why, and the fix."""
    if fix is None:
        fix = _WRAP if layer.startswith("nn.") else _KEEP
    other = "native" if layer.startswith("nn.") else "linen"
    return AdapterError(
        f"{_at(layer)} with `{option}={_show(option, value)}` has no {other} "
        f"equivalent: {why}. {fix}."
    )


def skeleton(cls: type, *args: Any, **kwargs: Any) -> eqx.Module:
    """An Equinox layer's structure without computing its initialisation."""
    return eqx.filter_eval_shape(cls, *args, key=jax.random.key(0), **kwargs)


_OWN_VARIABLES = (
    "Pass the layer's own variables, as its `init` returns them (for a layer inside "
    "a larger model, the entry under its name in each collection, e.g. "
    "`{'params': variables['params']['Dense_0']}`), and build the linen layer with "
    "the options the variables were made with (e.g. `use_bias`)."
)


def _check_entries(
    variables: dict,
    layer: str,
    expected: Mapping[str, tuple[str, ...]],
    fix: str = _OWN_VARIABLES,
) -> None:
    """Checks that each collection of `expected` holds exactly the entries (paths
    `a/b`) listed; reports every missing or unexpected one, in one error."""
    problems = []
    for collection, paths in expected.items():
        tree = variables.get(collection) or {}
        have = {"/".join(k) for k in traverse_util.flatten_dict(tree)}
        problems += [f"  {collection}/{p}: missing" for p in sorted(set(paths) - have)]
        problems += [
            f"  {collection}/{p}: unexpected (the layer has no such variable)"
            for p in sorted(have - set(paths))
        ]
    if problems:
        raise AdapterError(
            f"The variables given for {_at(layer)} do not match the layer (got "
            f"collections {sorted(variables)}):\n" + "\n".join(problems) + f"\n{fix}"
        )


def params_of(
    variables: dict, layer: str, expected: tuple[str, ...] | None = None
) -> dict:
    """The layer's `params`, checked: no other collection, and, with `expected`,
    exactly the entries listed."""
    extra = set(variables) - {"params"}
    if extra:
        raise AdapterError(
            f"{_at(layer)} has variables in {sorted(extra)}, which its converter does "
            "not know: only `params` was expected. Pass the `params` collection "
            "only, `{'params': variables['params']}`; if the layer does use these "
            "collections, register a converter for it that converts them "
            "(`adapters.register_converter`)."
        )
    if expected is not None:
        _check_entries(variables, layer, {"params": expected})
    return variables.get("params", {})


def _check_dtype(
    module: nn.Module, name: str, equinox: str, variables: dict | None = None
) -> None:
    """A computation `dtype=` is refused unless it is the dtype of every weight:
    linen casts to it, Equinox layers compute in the dtypes of their weights and
    inputs. Equal to the weights' dtype, linen's cast changes nothing that JAX's
    promotion does not (for inputs no wider than the weights)."""
    if module.dtype is None:
        return
    weights = {
        jnp.dtype(a.dtype)
        for a in jax.tree.leaves((variables or {}).get("params", {}))
        if jnp.issubdtype(a.dtype, jnp.inexact)
    }
    if weights == {jnp.dtype(module.dtype)}:
        return
    got = ", ".join(sorted(map(str, weights))) or "none"
    raise unsupported(
        name,
        "dtype",
        module.dtype,
        "linen casts to `dtype` (its input and parameters, or its output), "
        f"while {equinox} computes in the dtypes of its weights ({got}) and input, "
        "so the two differ",
        "Build the linen layer with `dtype=None` or the weights' dtype (the "
        "variables stay the same; `param_dtype` is kept), or keep it wrapped with "
        "`adapters.ToEquinox`",
    )


def _refuse_set(module: nn.Module, name: str, options: tuple[str, ...], why: str):
    """Refuses each of `options` that is set (not `None`) on `module`."""
    for option in options:
        if getattr(module, option) is not None:
            raise unsupported(name, option, getattr(module, option), why)


def _check_promote(module: nn.Module, name: str) -> None:
    if module.promote_dtype is not linen_dtypes.promote_dtype:
        raise unsupported(
            name,
            "promote_dtype",
            module.promote_dtype,
            "a custom dtype promotion changes what linen computes, and Equinox "
            "layers promote with JAX's rules",
        )


def _check_reductions(module: nn.Module, name: str, equinox: str) -> None:
    if not module.force_float32_reductions:
        raise unsupported(
            name,
            "force_float32_reductions",
            False,
            f"{equinox} computes its statistics in at least float32",
        )
