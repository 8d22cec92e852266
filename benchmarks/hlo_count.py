"""Figure 1, the compiled program: the optimised-HLO instruction count of each
step, wrapped / native, for both directions and both models.

Target: exactly 1.000 (the wrapper adds, removes and changes no instruction).

    python benchmarks/hlo_count.py [--quick] [--out DIR]
"""

import dataclasses
from typing import Any

import _common as C
import _models as M


NAME = "hlo_count"
TARGET = 1.0


def count_step(step: M.Step) -> str:
    """The optimised HLO text of a step."""
    return C.optimised_hlo(step.fn, *step.args)


def count_pair(pair: M.Pair) -> dict[str, Any]:
    """Instruction counts of a pair's wrapped and native programs, and per opcode
    where they differ."""
    wrapped, native = count_step(pair.wrapped), count_step(pair.native)
    w, n = C.count_instructions(wrapped), C.count_instructions(native)
    return {
        "wrapped": w,
        "native": n,
        "ratio": w / n,
        "equal": w == n,
        "opcode_diff": C.hlo_diff(wrapped, native),
    }


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0])
    sizes = M.sizes(args.quick)
    results, variants, targets = {}, {}, []
    for case in M.cases(sizes):
        for pair in case.pairs():
            r = results[pair.name] = count_pair(pair)
            targets.append(
                {
                    "figure": "1 compiled program",
                    "what": f"{pair.name}: HLO instructions wrapped/native",
                    "target": "== 1.000",
                    "value": r["ratio"],
                    "holds": r["equal"],
                }
            )
        for description, step in case.variants.items():
            wrapped = count_step(case.train.wrapped)
            native = count_step(step)
            w, n = C.count_instructions(wrapped), C.count_instructions(native)
            variants[f"{case.train.name}, {description}"] = {
                "wrapped": w,
                "native": n,
                "ratio": w / n,
                "opcode_diff": C.hlo_diff(wrapped, native),
            }

    C.print_table(
        "Figure 1: optimised-HLO instructions of the compiled step (target: "
        "wrapped/native == 1.000 exactly)",
        ["program", "wrapped", "native", "wrapped/native", "holds"],
        [
            [name, r["wrapped"], r["native"], f"{r['ratio']:.3f}", r["equal"]]
            for name, r in results.items()
        ],
    )
    C.print_table(
        "For information: against a native step that draws its dropout key "
        "differently from the wrapper",
        ["program", "wrapped", "native", "wrapped/native", "opcode differences"],
        [
            [
                name,
                r["wrapped"],
                r["native"],
                f"{r['ratio']:.3f}",
                C.short_diff(r["opcode_diff"]),
            ]
            for name, r in variants.items()
        ],
    )
    return C.report(
        args,
        NAME,
        targets,
        sizes=dataclasses.asdict(sizes),
        target=TARGET,
        results=results,
        variants=variants,
    )


if __name__ == "__main__":
    main()
