"""The RNG streams of an NNX module, derived from one JAX key: `nnx_reseed`."""

import jax
from flax import nnx
from flax.nnx import graph as nnx_graph
from jaxtyping import PRNGKeyArray

from ._errors import AdapterTypeError
from ._variables import check_key, linen_rngs


def stream_names(module: nnx.Module) -> tuple[str, ...]:
    """The names (tags) of the RNG streams that `module` holds, sorted."""
    return tuple(
        sorted(
            {
                stream.key.tag
                for _, stream in nnx_graph.iter_graph(module)
                if isinstance(stream, nnx.RngStream)
            }
        )
    )


def nnx_reseed(module: nnx.Module, key: PRNGKeyArray) -> None:
    """Reseeds, in place, every RNG stream of an NNX module from one JAX key.

    This is what a call `model(x, state, key=key)` of an
    [`adapters.NNXToEquinox`][] does to its rebuilt NNX module before calling it;
    call it yourself on the native NNX module to reproduce that call. Stream `name`
    is reseeded with `nnx.reseed(module, name=adapters.linen_rngs(key, name)[name],
    policy="match_shape")`: its key depends only on `key` and the stream's name
    (as for [`adapters.linen_rngs`][]), the counts restart at 0, and two streams
    of the same name (e.g. forked for two `nnx.Dropout` layers) get different keys
    in NNX's graph order, as `nnx.reseed` gives them.

    !!! Example

        ```python
        native = nnx.clone(module)
        adapters.nnx_reseed(native, key)
        expected = native(x)               # == model(x, state, key=key)[0]
        ```

    **Arguments:**

    - `module`: an NNX module; its RNG streams are changed in place, as
        `nnx.reseed` changes them.
    - `key`: a JAX PRNG key, new-style (`jax.random.key`) or raw (`PRNGKey`).

    **Raises:**

    [`adapters.AdapterError`][] (a `TypeError`) if `module` is not an NNX module or
    `key` is not one JAX key.
    """
    if not isinstance(module, nnx.Module):
        raise AdapterTypeError(
            "`adapters.nnx_reseed` reseeds the RNG streams of a `flax.nnx.Module`, "
            f"but got {type(module).__qualname__}."
        )
    check_key(key, "`adapters.nnx_reseed`'s `key`")
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy uint32[2] key, as NNX keys are
    names = stream_names(module)
    if names:
        nnx.reseed(module, policy="match_shape", **linen_rngs(key, names))
