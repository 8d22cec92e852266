"""Figure 6, scaling: dispatch and trace time as the model grows to 10, 100 and
1000 parameter leaves, and the wrapper's overhead per leaf: the slope of a
least-squares fit of time against leaves, wrapped minus native.

- ToEquinox: a linen module of N `nn.Dense(1, use_bias=False)` layers in a chain
  (N leaves), wrapped; dispatch is `jax.jit` with Equinox's partition pattern
  against `jax.jit` of linen's apply.
- ToLinen: an Equinox model of N `eqx.nn.Linear(1, 1, use_bias=False)` layers in
  a chain, wrapped; dispatch is `jax.jit` of linen's apply against `jax.jit` of
  the native model with the partition pattern.
- Trace: `jax.jit(fresh function).trace(*args)`, interleaved.

Targets: the wrapper's overhead grows no faster than native's cost: overhead per
leaf (wrapped slope - native slope) <= native slope; and a ToLinen trace costs at
most 1.15 x the native Equinox model's trace at 300 and at 1000 leaves.

    python benchmarks/scaling.py [--quick] [--out DIR]
    python benchmarks/scaling.py --profile    # where a wrapped trace's time goes
"""

import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

import _common as C
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import adapters


NAME = "scaling"
FULL_LEAVES = (10, 100, 300, 1000)
# ToLinen's trace against the native Equinox trace at these sizes: <= 1.15.
TRACE_TARGET, TRACE_TARGET_LEAVES = 1.15, (300, 1000)
QUICK_LEAVES = (2, 4, 8)


class LinenChain(nn.Module):
    n: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.n):
            x = nn.Dense(1, use_bias=False)(x)
        return x


class EqxChain(eqx.Module):
    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, n: int, key):
        keys = jax.random.split(key, n)
        self.layers = tuple(eqx.nn.Linear(1, 1, use_bias=False, key=k) for k in keys)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _ones(shapes):
    return jax.tree.map(lambda s: jnp.asarray(np.ones(s.shape, s.dtype)), shapes)


def to_equinox_variants(n: int) -> dict[str, tuple[Callable, tuple]]:
    """`{side: (function to jit, args)}` for a chain of n leaves."""
    module = LinenChain(n)
    x = jnp.ones((1, 1))
    variables = _ones(jax.eval_shape(module.init, jax.random.key(0), x))
    model, state = adapters.to_equinox(module, variables=variables)
    arrays, static = eqx.partition(model, eqx.is_array)
    return {
        "wrapped": (lambda a, x, s: eqx.combine(a, static)(x, s), (arrays, x, state)),
        "native": (lambda v, x: module.apply(v, x), (variables, x)),
    }


def to_linen_variants(n: int) -> dict[str, tuple[Callable, tuple]]:
    model = _ones(eqx.filter_eval_shape(EqxChain, n, jax.random.key(0)))
    x = jnp.ones((1,))
    module, variables = adapters.to_linen(model)
    arrays, static = eqx.partition(model, eqx.is_array)
    return {
        "wrapped": (lambda v, x: module.apply(v, x), (variables, x)),
        "native": (lambda a, x: eqx.combine(a, static)(x), (arrays, x)),
    }


DIRECTIONS = {"ToEquinox": to_equinox_variants, "ToLinen": to_linen_variants}


def _trace_sample(fn, args):
    def run():
        fresh = lambda *a: fn(*a)  # noqa: E731  a new function: no cache hit
        start = time.perf_counter()
        jax.jit(fresh).trace(*args)
        return time.perf_counter() - start

    return run


def measure(
    variants: dict[str, tuple[Callable, tuple]],
    dispatch_pairs: int,
    trace_pairs: int,
    sample_s: float,
) -> dict[str, dict[str, float]]:
    calls = {}
    for side, (fn, args) in variants.items():
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))  # compile
        calls[side] = lambda jitted=jitted, args=args: jitted(*args)
    number = C.calibrate(calls["native"], sample_s)
    dispatch = C.interleaved(
        C.per_call(calls["wrapped"], number),
        C.per_call(calls["native"], number),
        dispatch_pairs,
    )["time"]
    trace = C.interleaved(
        _trace_sample(*variants["wrapped"]),
        _trace_sample(*variants["native"]),
        trace_pairs,
    )["time"]
    return {"dispatch": dispatch, "trace": trace}


def profile(n: int) -> None:
    """cProfile of one wrapped trace per direction at n leaves: the adapter's own
    functions, by cumulative time, and the whole trace's total."""
    for direction, variants_of in DIRECTIONS.items():
        fn, args = variants_of(n)["wrapped"]
        _trace_sample(fn, args)()  # warm JAX's own caches
        profiler = cProfile.Profile()
        profiler.enable()
        _trace_sample(fn, args)()
        profiler.disable()
        print(f"\n=== {direction}, {n} leaves: one trace of the wrapped call")
        stats = pstats.Stats(profiler)
        print(f"total {stats.total_tt:.3f} s (under the profiler)")  # type: ignore
        stats.sort_stats("cumulative").print_stats("adapters/", 15)


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0], profile=True)
    leaves = QUICK_LEAVES if args.quick else FULL_LEAVES
    if args.profile:
        profile(leaves[-1])
        return {}
    dispatch_pairs, trace_pairs, sample_s = (
        (1, 1, 0.001) if args.quick else (41, 9, 0.02)
    )
    results: dict[str, Any] = {}
    slopes: dict[str, Any] = {}
    targets = []
    rows, slope_rows = [], []
    for direction, variants_of in DIRECTIONS.items():
        per_n = results[direction] = {}
        for n in leaves:
            per_n[n] = measure(variants_of(n), dispatch_pairs, trace_pairs, sample_s)
        if direction == "ToLinen" and not args.quick:
            for n in TRACE_TARGET_LEAVES:
                ratio = per_n[n]["trace"]["ratio"]
                targets.append(
                    {
                        "figure": "6 scaling",
                        "what": f"ToLinen trace at {n} leaves, wrapped/native",
                        "target": f"<= {TRACE_TARGET}",
                        "value": ratio,
                        "holds": ratio <= TRACE_TARGET,
                    }
                )
        for metric in ("dispatch", "trace"):
            wrapped = [per_n[n][metric]["a"] for n in leaves]
            native = [per_n[n][metric]["b"] for n in leaves]
            for n, w, nat in zip(leaves, wrapped, native):
                rows.append(
                    [
                        direction,
                        metric,
                        n,
                        C.fmt_time(w),
                        C.fmt_time(nat),
                        f"{per_n[n][metric]['ratio']:.3f}",
                    ]
                )
            s_w, s_n = C.fit_slope(leaves, wrapped), C.fit_slope(leaves, native)
            overhead = s_w - s_n
            holds = overhead <= max(s_n, 0.0)
            slopes.setdefault(direction, {})[metric] = {
                "wrapped_per_leaf": s_w,
                "native_per_leaf": s_n,
                "overhead_per_leaf": overhead,
                "overhead_over_native": overhead / s_n if s_n > 0 else None,
                "holds": holds,
            }
            targets.append(
                {
                    "figure": "6 scaling",
                    "what": f"{direction} {metric}: overhead per leaf <= native's",
                    "target": "overhead slope <= native slope",
                    "value": overhead / s_n if s_n > 0 else None,
                    "holds": holds,
                }
            )
            slope_rows.append(
                [
                    direction,
                    metric,
                    C.fmt_time(s_n),
                    C.fmt_time(s_w),
                    C.fmt_time(overhead),
                    C.fmt(overhead / s_n if s_n > 0 else None),
                    holds,
                ]
            )
    C.print_table(
        f"Figure 6: dispatch and trace time against parameter leaves "
        f"(medians of {dispatch_pairs} / {trace_pairs} interleaved pairs)",
        ["", "metric", "leaves", "wrapped", "native", "wrapped/native"],
        rows,
    )
    C.print_table(
        "Figure 6: per-leaf slopes of least-squares fits (target: wrapper overhead "
        "per leaf <= native per leaf)",
        [
            "",
            "metric",
            "native / leaf",
            "wrapped / leaf",
            "overhead / leaf",
            "overhead/native",
            "holds",
        ],
        slope_rows,
    )
    return C.report(
        args,
        NAME,
        targets,
        leaves=list(leaves),
        results=results,
        slopes=slopes,
    )


if __name__ == "__main__":
    main()
