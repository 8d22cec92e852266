"""Runs every benchmark script in one process, then prints which targets hold.

    python benchmarks/run_all.py            # the full run (about 10 minutes on 2 cores)
    python benchmarks/run_all.py --quick --out /tmp/bench   # tiny sizes, for tests

Each script writes `<out>/<name>.json`; this one also writes `<out>/run_all.json`
(wall time per script, and every target with its value and verdict).
"""

import importlib
import pathlib
import sys
import time
from typing import Any


HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common as C  # noqa: E402


SCRIPTS = (
    "hlo_count",  # figure 1
    "step_time",  # figure 2
    "dispatch",  # figure 3
    "trace_compile",  # figure 4
    "memory",  # figure 5
    "scaling",  # figure 6
    "nnx",  # NNX modules
)


def main(argv=None) -> dict[str, Any]:
    args = C.parse_args(argv, __doc__.splitlines()[0])
    forwarded = (["--quick"] if args.quick else []) + ["--out", str(args.out)]
    start = time.perf_counter()
    seconds, targets = {}, []
    for name in SCRIPTS:
        script_start = time.perf_counter()
        payload = importlib.import_module(name).main(forwarded)
        seconds[name] = time.perf_counter() - script_start
        targets += payload["targets"]
        print(f"[{name}: {seconds[name]:.1f} s]", flush=True)
    total = time.perf_counter() - start
    C.print_table(
        "Targets",
        ["figure", "what", "target", "value", "holds"],
        [
            [t["figure"], t["what"], t["target"], C.fmt(t["value"]), t["holds"]]
            for t in targets
        ],
    )
    print(
        "run times: "
        + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
        + f"; total {total:.0f} s"
    )
    return C.report(
        args,
        "run_all",
        targets,
        seconds=seconds,
        total_seconds=total,
    )


if __name__ == "__main__":
    main()
