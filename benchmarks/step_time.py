"""Figure 2, step time: the steady-state time of each compiled step, wrapped /
native, interleaved (A B A B ...), as the median of the per-pair ratios.

Both sides are `jax.jit` of the step functions of `_models.py` (the wrapped
ToEquinox steps with Equinox's partition pattern), called in a loop that feeds each
step's outputs (parameters, optimiser state, BatchNorm statistics or decode cache)
into the next call, as a training or decoding loop does.

Also, per call, the pytree work of `jax.jit`'s dispatch (flatten the arguments,
unflatten the outputs), wrapped and native, and the wrapper's extra work as a
share of the native step: the most that dispatch can add to the step time.

Target: <= 1.02.

    python benchmarks/step_time.py [--quick] [--out DIR]
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import _common as C
import _models as M
import jax


NAME = "step_time"
TARGET = 1.02


def loop(step: M.Step) -> Callable[[], Any]:
    """One call of the jitted step per call, each fed the previous outputs."""
    jitted = jax.jit(step.fn)
    args = [step.args]

    def call():
        out = jitted(*args[0])
        args[0] = step.feed(args[0], out)
        return out

    return call


def pytree_work(step: M.Step) -> Callable[[], None]:
    """The pytree work that `jax.jit`'s dispatch does in Python for one call of the
    step: flatten its arguments and unflatten its outputs (an `eqx.Module` or an
    `eqx.nn.State` flattens with a Python callback; dicts and tuples in C++)."""
    shapes = jax.eval_shape(step.fn, *step.args)
    out_leaves, out_def = jax.tree.flatten(shapes)

    def work():
        jax.tree.flatten(step.args)
        jax.tree.unflatten(out_def, out_leaves)

    return work


def time_pair(pair: M.Pair, pairs: int, sample_s: float) -> dict[str, float]:
    wrapped, native = loop(pair.wrapped), loop(pair.native)
    jax.block_until_ready((wrapped(), native()))  # compile
    number = C.calibrate(native, sample_s)
    step = C.interleaved(C.per_call(wrapped, number), C.per_call(native, number), pairs)
    work_w, work_n = pytree_work(pair.wrapped), pytree_work(pair.native)
    work_number = C.calibrate(work_n, sample_s / 5)
    work = C.interleaved(
        C.per_call(work_w, work_number), C.per_call(work_n, work_number), pairs
    )["time"]
    return step["time"] | {
        "calls_per_sample": number,
        "pytree_wrapped": work["a"],
        "pytree_native": work["b"],
        # The most that the wrapper's extra dispatch work can add to a step.
        "pytree_extra_over_step": (work["a"] - work["b"]) / step["time"]["b"],
    }


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0])
    sizes = M.sizes(args.quick)
    pairs, sample_s = (1, 0.001) if args.quick else (81, 0.05)
    results, targets = {}, []
    for pair in M.pairs(sizes):
        r = results[pair.name] = time_pair(pair, pairs, sample_s)
        targets.append(
            {
                "figure": "2 step time",
                "what": f"{pair.name}: step time wrapped/native",
                "target": f"<= {TARGET}",
                "value": r["ratio"],
                "holds": C.verdict(r["ratio"], TARGET),
            }
        )
    C.print_table(
        f"Figure 2: steady-state step time, median of {pairs} interleaved pairs "
        f"(target: wrapped/native <= {TARGET})",
        [
            "program",
            "wrapped",
            "native",
            "wrapped/native",
            "quartiles",
            "pytree work w (n)",
            "extra/step",
            "holds",
        ],
        [
            [
                name,
                C.fmt_time(r["a"]),
                C.fmt_time(r["b"]),
                f"{r['ratio']:.3f}",
                f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}",
                f"{C.fmt_time(r['pytree_wrapped'])} ({C.fmt_time(r['pytree_native'])})",
                f"{100 * r['pytree_extra_over_step']:.1f}%",
                C.verdict(r["ratio"], TARGET),
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
