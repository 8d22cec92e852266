"""Figure 3, dispatch: the per-call time of a tiny jitted model (one Dense(4) /
eqx.nn.Linear(4, 4) on a (1, 4) input), where the compute is negligible and the
time is the Python and pytree work of a call. Each ratio is its own interleaved
A/B run (median of the per-pair ratios).

ToEquinox (`adapters.to_equinox(nn.Dense(4), variables=...)`):

- `jax.jit` with Equinox's partition pattern, `arrays, static =
  eqx.partition(model, eqx.is_array)`, `jax.jit(lambda arrays, x, state:
  eqx.combine(arrays, static)(x, state))`, against `jax.jit` of linen's
  `module.apply(variables, x)`. Target <= 1.2.
- `eqx.filter_jit(lambda m, x, s: m(x, s))` of the wrapper, against
  `eqx.filter_jit` of the equivalent native Equinox layer, `eqx.nn.Linear(4, 4)`
  called on the batch with `jax.vmap`, with its (empty) `eqx.nn.State` threaded in
  and out as the wrapper's is, so that both sides pass the same kinds of
  arguments. Target <= 1.1.
- For comparison, Flax's own bridge: `nnx.bridge.ToNNX(nn.Dense(4),
  rngs=nnx.Rngs(0))`, lazily initialised with `nnx.bridge.lazy_init`, called under
  `nnx.jit`, against the same `jax.jit` of linen's apply.
- Where the time goes (no target): linen's apply with an empty `eqx.nn.State`
  passed in and returned, and `eqx.nn.Linear` in the same partition pattern, each
  against linen's apply; and the wrapper against that `eqx.nn.Linear`.

ToLinen (`adapters.to_linen(eqx.nn.Linear(4, 4), vmap_axis=0)`):

- `jax.jit` of linen's `apply` against `jax.jit` of the native Equinox layer with
  the partition pattern (`jax.vmap` inside), target <= 1.2 (by symmetry with the
  ToEquinox figure); and against `eqx.filter_jit` of the native layer.

    python benchmarks/dispatch.py [--quick] [--out DIR]
    python benchmarks/dispatch.py --profile    # where the time of a call goes
"""

import cProfile
import pstats
import warnings
from collections.abc import Callable
from typing import Any

import _common as C
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adapters


NAME = "dispatch"
JIT_TARGET = 1.2
FILTER_JIT_TARGET = 1.1


def callables() -> dict[str, Callable[[], Any]]:
    """Every variant, as a zero-argument call (compiled on first call)."""
    x = jnp.asarray(np.ones((1, 4), np.float32))
    module = nn.Dense(4)
    variables = {
        "params": {
            "kernel": jnp.asarray(np.full((4, 4), 0.5, np.float32)),
            "bias": jnp.asarray(np.zeros(4, np.float32)),
        }
    }
    model, state = adapters.to_equinox(module, variables=variables)
    arrays, static = eqx.partition(model, eqx.is_array)

    linear, linear_state = eqx.nn.make_with_state(eqx.nn.Linear)(
        4, 4, key=jax.random.key(0)
    )
    linear_arrays, linear_static = eqx.partition(linear, eqx.is_array)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnx may warn about its own API evolution
        nnx_model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(nnx_model, x)

    linen_jit = jax.jit(lambda v, x: module.apply(v, x))
    linen_state_jit = jax.jit(lambda v, x, s: (module.apply(v, x), s))
    wrapped_jit = jax.jit(lambda a, x, s: eqx.combine(a, static)(x, s))
    wrapped_filter_jit = eqx.filter_jit(lambda m, x, s: m(x, s))
    linear_filter_jit = eqx.filter_jit(lambda m, x, s: (jax.vmap(m)(x), s))
    linear_state_jit = jax.jit(
        lambda a, x, s: (jax.vmap(eqx.combine(a, linear_static))(x), s)
    )
    nnx_jit = nnx.jit(lambda m, x: m(x))

    to_linen, linen_variables = adapters.to_linen(linear, vmap_axis=0)
    to_linen_jit = jax.jit(lambda v, x: to_linen.apply(v, x))
    linear_jit = jax.jit(lambda a, x: jax.vmap(eqx.combine(a, linear_static))(x))
    linear_filter_jit_stateless = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))

    return {
        "linen jax.jit": lambda: linen_jit(variables, x),
        "ToEquinox jax.jit partition": lambda: wrapped_jit(arrays, x, state),
        "ToEquinox eqx.filter_jit": lambda: wrapped_filter_jit(model, x, state),
        "eqx.nn.Linear eqx.filter_jit (state threaded)": lambda: linear_filter_jit(
            linear, x, linear_state
        ),
        "nnx ToNNX nnx.jit": lambda: nnx_jit(nnx_model, x),
        "linen jax.jit, eqx.nn.State in and out": lambda: linen_state_jit(
            variables, x, state
        ),
        "eqx.nn.Linear jax.jit partition (state threaded)": lambda: linear_state_jit(
            linear_arrays, x, linear_state
        ),
        "ToLinen jax.jit apply": lambda: to_linen_jit(linen_variables, x),
        "eqx.nn.Linear jax.jit partition": lambda: linear_jit(linear_arrays, x),
        "eqx.nn.Linear eqx.filter_jit": lambda: linear_filter_jit_stateless(linear, x),
    }


# (figure row, A, B, target or None)
COMPARISONS = [
    ("ToEquinox", "ToEquinox jax.jit partition", "linen jax.jit", JIT_TARGET),
    (
        "ToEquinox",
        "ToEquinox eqx.filter_jit",
        "eqx.nn.Linear eqx.filter_jit (state threaded)",
        FILTER_JIT_TARGET,
    ),
    ("Flax bridge", "nnx ToNNX nnx.jit", "linen jax.jit", None),
    ("where it goes", "linen jax.jit, eqx.nn.State in and out", "linen jax.jit", None),
    (
        "where it goes",
        "eqx.nn.Linear jax.jit partition (state threaded)",
        "linen jax.jit",
        None,
    ),
    (
        "where it goes",
        "ToEquinox jax.jit partition",
        "eqx.nn.Linear jax.jit partition (state threaded)",
        None,
    ),
    ("ToLinen", "ToLinen jax.jit apply", "eqx.nn.Linear jax.jit partition", JIT_TARGET),
    ("ToLinen", "ToLinen jax.jit apply", "eqx.nn.Linear eqx.filter_jit", None),
]


PROFILED = (
    "linen jax.jit",
    "linen jax.jit, eqx.nn.State in and out",
    "ToEquinox jax.jit partition",
    "ToEquinox eqx.filter_jit",
    "eqx.nn.Linear eqx.filter_jit (state threaded)",
)


def profile(calls: dict[str, Callable[[], Any]], number: int = 20_000) -> None:
    """cProfile of `number` calls of each variant: the Python functions that a call
    runs (the C++ dispatch of `jax.jit` calls back into Python only to flatten
    and unflatten custom pytree nodes such as `eqx.Module` and `eqx.nn.State`)."""
    for name in PROFILED:
        call = calls[name]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(number):
            call()
        profiler.disable()
        print(f"\n=== {name}: {number} calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(10)


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0], profile=True)
    pairs, sample_s = (1, 0.001) if args.quick else (81, 0.02)
    calls = callables()
    for call in calls.values():
        jax.block_until_ready(call())  # compile
    if args.profile:
        profile(calls, 200 if args.quick else 20_000)
        return {}
    results, targets, rows = [], [], []
    for group, a, b, target in COMPARISONS:
        r = C.interleaved(
            C.per_call(calls[a], C.calibrate(calls[a], sample_s)),
            C.per_call(calls[b], C.calibrate(calls[b], sample_s)),
            pairs,
        )["time"]
        holds = None if target is None else C.verdict(r["ratio"], target)
        results.append({"group": group, "a": a, "b": b, "target": target} | r)
        if target is not None:
            targets.append(
                {
                    "figure": "3 dispatch",
                    "what": f"{a} / {b}",
                    "target": f"<= {target}",
                    "value": r["ratio"],
                    "holds": holds,
                }
            )
        rows.append(
            [
                group,
                f"{a} / {b}",
                C.fmt_time(r["a"]),
                C.fmt_time(r["b"]),
                f"{r['ratio']:.3f}",
                f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}",
                "-" if target is None else f"<= {target}",
                holds,
            ]
        )
    C.print_table(
        f"Figure 3: dispatch, per call of a jitted Dense(4) on (1, 4), median of "
        f"{pairs} interleaved pairs",
        ["", "A / B", "A", "B", "A/B", "quartiles", "target", "holds"],
        rows,
    )
    return C.report(
        args,
        NAME,
        targets,
        results=results,
    )


if __name__ == "__main__":
    main()
