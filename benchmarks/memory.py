"""Figure 5, memory of the compiled step: `compiled.memory_analysis()` of each
step, wrapped / native: temporary buffers, arguments, outputs and peak (aliasing
and generated code are in the JSON; both are 0 on CPU).

Target: 1.00 for temporary, argument, output and peak bytes (the same buffers).

    python benchmarks/memory.py [--quick] [--out DIR]
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import _common as C
import _models as M
import jax


NAME = "memory"
TARGET = 1.0
CHECKED = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "peak_memory_in_bytes",
)


def ratio(a: int | None, b: int | None) -> float | None:
    if a is None or b is None or (a == 0 and b == 0):
        return None
    return a / b if b else float("inf")


def memory_pair(pair: M.Pair) -> dict[str, Any]:
    wrapped = C.memory(C.compiled(pair.wrapped.fn, *pair.wrapped.args))
    native = C.memory(C.compiled(pair.native.fn, *pair.native.args))
    return {
        "wrapped": wrapped,
        "native": native,
        "ratio": {f: ratio(wrapped[f], native[f]) for f in C.MEMORY_FIELDS},
        "equal": all(wrapped[f] == native[f] for f in CHECKED),
    }


def outputs_in_native_order(pair: M.Pair) -> Callable[..., Any] | None:
    """The wrapped step, returning its outputs' leaves in the order of the native
    step's outputs (for an output that the loop feeds back into an argument, the
    order of that argument's leaves in the native step), or None where the orders
    already agree. Linen variables are dicts, which JAX flattens in sorted key
    order; an Equinox model flattens in field order."""
    wrapped, native = pair.wrapped, pair.native
    n_out = len(jax.eval_shape(wrapped.fn, *wrapped.args))
    slots = tuple(object() for _ in range(n_out))
    fed = wrapped.feed(tuple(range(len(wrapped.args))), slots)
    orders = {}
    for position, value in enumerate(fed):
        for k, slot in enumerate(slots):
            if value is slot:
                order = C.leaf_order(wrapped.args[position], native.args[position])
                if order is not None and order != sorted(order):
                    orders[k] = order
    if not orders:
        return None

    def fn(*args):
        out = wrapped.fn(*args)
        return tuple(
            [jax.tree.leaves(o)[i] for i in orders[k]] if k in orders else o
            for k, o in enumerate(out)
        )

    return fn


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0])
    sizes = M.sizes(args.quick)
    results, targets, reordered = {}, [], {}
    for pair in M.pairs(sizes):
        r = results[pair.name] = memory_pair(pair)
        fn = outputs_in_native_order(pair)
        if fn is not None:
            m = C.memory(C.compiled(fn, *pair.wrapped.args))
            reordered[pair.name] = {
                "wrapped_outputs_in_native_order": m,
                "native": r["native"],
                "equal": all(m[f] == r["native"][f] for f in CHECKED),
            }
        targets.append(
            {
                "figure": "5 memory",
                "what": f"{pair.name}: temp/argument/output/peak bytes wrapped/native",
                "target": "== 1.00",
                "value": r["ratio"]["temp_size_in_bytes"],
                "holds": r["equal"],
            }
        )

    C.print_table(
        "Figure 5: memory of the compiled step, bytes wrapped (native), and "
        "wrapped/native (target: 1.00 for temp, argument, output and peak)",
        ["program", "temp", "argument", "output", "peak", "ratios t/a/o/p", "holds"],
        [
            [
                name,
                *(f"{r['wrapped'][f]} ({r['native'][f]})" for f in CHECKED),
                "/".join(C.fmt(r["ratio"][f], 4) for f in CHECKED),
                r["equal"],
            ]
            for name, r in results.items()
        ],
    )
    C.print_table(
        "Why a ToLinen step's temporary bytes may differ: linen variables are dicts, "
        "flattened in sorted key order, an Equinox model in field order; the same "
        "wrapped step returning its outputs in Equinox's leaf order",
        ["program", "temp, outputs reordered", "temp, native", "same bytes"],
        [
            [
                name,
                r["wrapped_outputs_in_native_order"]["temp_size_in_bytes"],
                r["native"]["temp_size_in_bytes"],
                r["equal"],
            ]
            for name, r in reordered.items()
        ],
    )
    return C.report(
        args,
        NAME,
        targets,
        sizes=dataclasses.asdict(sizes),
        target=TARGET,
        results=results,
        outputs_in_native_order=reordered,
    )


if __name__ == "__main__":
    main()
