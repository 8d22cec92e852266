"""Train / inference keywords of a linen call: which ones the `inference` flag of a
`ToEquinox` sets, and to what.

Linen modules switch between training and inference with a keyword of their call
(`train`, `deterministic`, ...), Equinox models with an `inference` field that
`eqx.nn.inference_mode` flips. A wrapper that left such a keyword alone would make
`inference_mode` a silent no-op, so the keywords linen code conventionally uses are
mapped unless the user names the keywords (or none) explicitly.
"""

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn


# Keywords meaning "training" (passed `not inference`) and "inference" (passed
# `inference`), by linen's conventions: `nn.Dropout(deterministic=)`,
# `nn.BatchNorm(use_running_average=)`, `train`/`training` in most model code.
TRAIN_NAMES = ("train", "training", "is_training")
DETERMINISTIC_NAMES = ("deterministic", "use_running_average", "inference")


def method_function(module: nn.Module, method: Any) -> Any:
    """The function linen's `method=` (`None`, a name or a function) calls."""
    if method is None:
        return type(module).__call__
    if isinstance(method, str):
        return getattr(type(module), method, None)
    return method


def _signature(module: nn.Module, method: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(method_function(module, method))  # pyright: ignore
    except (TypeError, ValueError):
        return None


def takes_key_at(module: nn.Module, method: Any, args: tuple, index: int) -> bool:
    """Whether positional argument `index` of the linen method is a key of the
    module's own (a parameter whose name ends in the word `key`, `rng` or `prng`),
    as some modules take the key they sample with as an input."""
    signature = _signature(module, method)
    if signature is None:
        return False
    try:
        bound = signature.bind_partial(module, *args[: index + 1]).arguments
    except TypeError:
        return False
    name = list(bound)[-1] if bound else ""
    # The last word names what it is: `key`, `rng`, `prng_key`, `dropout_rng`; not
    # `key_value_states` (attention's) or `keys`.
    return name.lower().rsplit("_", 1)[-1] in ("key", "rng", "prng")


def accepts(module: nn.Module, method: Any, name: str, args: tuple = ()) -> bool:
    """Whether the linen method takes keyword `name`, not already given among the
    positional `args`. Unknown signatures are given the keyword."""
    signature = _signature(module, method)
    if signature is None:
        return True
    if _bound_positionally(signature, module, name, args):
        return False  # passed positionally: an explicit value wins
    return any(
        p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in signature.parameters.values()
    )


def _bound_positionally(
    signature: inspect.Signature, module: nn.Module, name: str, args: tuple
) -> bool:
    try:
        return name in signature.bind_partial(module, *args).arguments
    except TypeError:
        return False


def named(module: nn.Module, method: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of `names` that the method's signature names as parameters (not merely
    accepted through `**kwargs`)."""
    signature = _signature(module, method)
    if signature is None:
        return ()
    params = signature.parameters
    return tuple(
        n
        for n in names
        if n in params
        and params[n].kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def resolve(
    module: nn.Module,
    method: Any,
    train_kwarg: tuple[str, ...] | None,
    deterministic_kwarg: tuple[str, ...] | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The `(train, deterministic)` keywords to set for a call of `method`: the
    names given, or (for an option left at `None`) the conventional names the
    method's signature has.

    A conventional name is not mapped when the module has an attribute of that name
    that is set (`nn.Dropout(0.5, deterministic=True)`): linen merges the attribute
    with the call's keyword and refuses both, and the user has fixed the mode."""
    explicit = (*(train_kwarg or ()), *(deterministic_kwarg or ()))

    def auto(names: tuple[str, ...]) -> tuple[str, ...]:
        free = tuple(
            n for n in names if n not in explicit and getattr(module, n, None) is None
        )
        return named(module, method, free)

    if train_kwarg is None:
        train_kwarg = auto(TRAIN_NAMES)
    if deterministic_kwarg is None:
        deterministic_kwarg = auto(DETERMINISTIC_NAMES)
    return train_kwarg, deterministic_kwarg


def mode_kwargs(
    kwargs: dict[str, Any],
    inference: bool,
    train_kwarg: tuple[str, ...],
    deterministic_kwarg: tuple[str, ...],
    takes: Callable[[str], bool],
) -> dict[str, Any]:
    """Adds `train=not inference` / `deterministic=inference` for the keywords the
    called method takes, unless the caller gave the keyword: an explicit keyword
    wins."""
    out = dict(kwargs)
    for name in train_kwarg:
        if takes(name):
            out.setdefault(name, not inference)
    for name in deterministic_kwarg:
        if takes(name):
            out.setdefault(name, inference)
    return out
