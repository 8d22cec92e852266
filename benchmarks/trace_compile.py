"""Figure 4, trace and compile time of each step, wrapped / native: `jax.jit` of a
fresh function object every repetition (so that no JAX cache is hit), timed as
trace (`jit(f).trace(*args)`), lower (`traced.lower()`) and compile
(`lowered.compile()`), interleaved A B A B; medians of the per-pair ratios.

Target: trace + lower + compile <= 1.10.

    python benchmarks/trace_compile.py [--quick] [--out DIR]
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import _common as C
import _models as M
import jax


NAME = "trace_compile"
TARGET = 1.10
METRICS = ("trace", "lower", "compile", "total")


def sample(step: M.Step) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        fn = step.fresh()
        start = time.perf_counter()
        traced = jax.jit(fn).trace(*step.args)
        traced_at = time.perf_counter()
        lowered = traced.lower()
        lowered_at = time.perf_counter()
        lowered.compile()
        end = time.perf_counter()
        return {
            "trace": traced_at - start,
            "lower": lowered_at - traced_at,
            "compile": end - lowered_at,
            "total": end - start,
        }

    return run


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0])
    sizes = M.sizes(args.quick)
    pairs, warmup = (1, 0) if args.quick else (11, 1)
    results, targets = {}, []
    for pair in M.pairs(sizes):
        r = results[pair.name] = C.interleaved(
            sample(pair.wrapped), sample(pair.native), pairs, warmup
        )
        total = r["total"]["ratio"]
        targets.append(
            {
                "figure": "4 trace + compile",
                "what": f"{pair.name}: trace+lower+compile wrapped/native",
                "target": f"<= {TARGET}",
                "value": total,
                "holds": C.verdict(total, TARGET),
            }
        )
    C.print_table(
        f"Figure 4: trace + lower + compile time, fresh functions, median of "
        f"{pairs} interleaved pairs (target: total wrapped/native <= {TARGET})",
        [
            "program",
            "wrapped total",
            "native total",
            "trace w/n",
            "lower w/n",
            "compile w/n",
            "total w/n",
            "holds",
        ],
        [
            [
                name,
                C.fmt_time(r["total"]["a"]),
                C.fmt_time(r["total"]["b"]),
                *(f"{r[m]['ratio']:.3f}" for m in METRICS),
                C.verdict(r["total"]["ratio"], TARGET),
            ]
            for name, r in results.items()
        ],
    )
    return C.report(
        args,
        NAME,
        targets,
        sizes=dataclasses.asdict(sizes),
        target=TARGET,
        results=results,
    )


if __name__ == "__main__":
    main()
