"""Shared helpers of the benchmark scripts.

- `interleaved`: A/B timing that alternates the two variants, A B A B ..., and
  reports the median of the ratios of neighbouring samples A/B (robust to other
  processes using the CPU: a slow spell hits both sides of a ratio).
- `optimised_hlo`, `count_instructions`, `opcode_histogram`, `hlo_diff`: the
  optimised HLO of `jax.jit(f).lower(*args).compile()` and its instruction count.
- `memory`: `compiled.memory_analysis()` as a dict.
- `fit_slope`: least-squares slope, for the scaling figures.
- `parse_args`, `write_json`, `print_table`, `environment`: the scripts' plumbing.
"""

import argparse
import gc
import json
import os
import pathlib
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- CLI


def parse_args(
    argv: Sequence[str] | None, description: str, profile: bool = False
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if profile:
        parser.add_argument(
            "--profile",
            action="store_true",
            help="only print a cProfile of the calls (where the time goes)",
        )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few repetitions (for the test suite): figures are noise",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=RESULTS,
        help=f"directory of the JSON result (default {RESULTS})",
    )
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    import equinox
    import flax
    import jaxlib
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(out: pathlib.Path, name: str, payload: dict[str, Any]) -> pathlib.Path:
    """Writes `payload` (plus the environment) to `out/name.json`."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    document = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    return path


def report(
    args: argparse.Namespace, name: str, targets: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """A script's result: `quick`, its own `fields`, its `targets` and whether they
    all hold; written to `args.out/name.json` (with the environment) and returned."""
    payload = {
        "quick": args.quick,
        **fields,
        "targets": targets,
        "holds": all(t["holds"] for t in targets),
    }
    write_json(args.out, name, payload)
    return payload


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if value is None:
        return "-"
    return str(value)


def fmt_time(seconds: float | None) -> str:
    """Seconds in a readable unit."""
    if seconds is None:
        return "-"
    magnitude = abs(seconds)
    if magnitude >= 1:
        return f"{seconds:.3f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.2f} us"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]):
    """Prints a Markdown table (pastes as is into benchmarks/README.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
        for i, h in enumerate(headers)
    ]

    def line(items):
        return "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"

    print(f"\n{title}\n")
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(line(row))
    print(flush=True)


# ----------------------------------------------------------------------------- HLO


def compiled(f: Callable[..., Any], *args: Any) -> Any:
    """`jax.jit(f).lower(*args).compile()`: a fresh jit, so nothing is cached."""
    return jax.jit(f).lower(*args).compile()


def optimised_hlo(f: Callable[..., Any], *args: Any) -> str:
    """The optimised HLO text of `jax.jit(f)` on `args`."""
    return compiled(f, *args).as_text()


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s+=\s+(.*)$")


def _opcode(rhs: str) -> str:
    """The opcode of an instruction's right-hand side, `f32[4]{0} add(%a, %b), ...`
    or `(f32[], s32[]) tuple(...)`: the word before the first `(` after the type."""
    i = 0
    if rhs.startswith("("):  # a tuple type: skip its balanced parentheses
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        i += 1
    else:
        i = rhs.find(" ")
    match = re.match(r"\s*([\w\-]+)\(", rhs[i:])
    return match.group(1) if match else "?"


def instructions(hlo_text: str) -> list[str]:
    """The opcode of every instruction of every computation of an HLO module
    (the entry computation, fusion bodies, reducers, ...)."""
    out = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            out.append(_opcode(match.group(1)))
    return out


def count_instructions(hlo_text: str) -> int:
    return len(instructions(hlo_text))


def opcode_histogram(hlo_text: str) -> dict[str, int]:
    return dict(sorted(Counter(instructions(hlo_text)).items()))


def hlo_diff(wrapped: str, native: str) -> dict[str, int]:
    """Per opcode: wrapped count minus native count, only where they differ."""
    a, b = Counter(instructions(wrapped)), Counter(instructions(native))
    return {op: a[op] - b[op] for op in sorted(set(a) | set(b)) if a[op] != b[op]}


def short_diff(diff: dict[str, int], top: int = 5) -> str:
    """`{"while": 1, "xor": 9, ...}` as `xor +9, copy +17, ...` (largest first)."""
    items = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]
    more = ", ..." if len(diff) > top else ""
    return ", ".join(f"{op} {n:+d}" for op, n in items) + more if diff else "none"


# -------------------------------------------------------------- leaf order


def key_strings(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A JAX key path as strings: `.layers[0].weight` and `["layers"]["0"]
    ["weight"]` both become `("layers", "0", "weight")`, the naming `ToLinen`
    gives Equinox leaves in linen's nested dicts."""
    out = []
    for entry in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(entry, attribute):
                out.append(str(getattr(entry, attribute)))
                break
        else:
            out.append(str(entry))
    return tuple(out)


def leaf_order(tree_a: Any, tree_b: Any) -> list[int] | None:
    """For each leaf of `tree_b`, the index of the same leaf among `tree_a`'s: the
    very same array, or else the same path as `key_strings`. None if the leaves do
    not match one to one."""
    flat_a = jax.tree_util.tree_flatten_with_path(tree_a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(tree_b)[0]
    if len(flat_a) != len(flat_b):
        return None
    by_id = {id(leaf): i for i, (_, leaf) in enumerate(flat_a)}
    by_path = {key_strings(path): i for i, (path, _) in enumerate(flat_a)}
    for order in (
        [by_id.get(id(leaf)) for _, leaf in flat_b],
        [by_path.get(key_strings(path)) for path, _ in flat_b],
    ):
        if None not in order and len(set(order)) == len(order):
            return order  # type: ignore[return-value]
    return None


# -------------------------------------------------------------------------- memory


MEMORY_FIELDS = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
    "peak_memory_in_bytes",
)


def memory(compiled_: Any) -> dict[str, int | None]:
    """`compiled.memory_analysis()` as a dict (fields the backend lacks are None;
    alias and generated code are 0 on CPU: nothing is donated, code is not
    counted)."""
    stats = compiled_.memory_analysis()
    return {f: getattr(stats, f, None) for f in MEMORY_FIELDS}


# -------------------------------------------------------------------------- timing


def per_call(fn: Callable[[], Any], number: int) -> Callable[[], float]:
    """A sample: `number` calls of `fn`, blocking on the last result; seconds per
    call."""

    def sample() -> float:
        start = time.perf_counter()
        for _ in range(number):
            result = fn()
        jax.block_until_ready(result)
        return (time.perf_counter() - start) / number

    return sample


def calibrate(fn: Callable[[], Any], target: float, cap: int = 100_000) -> int:
    """The number of calls of `fn` that takes about `target` seconds (at least 1)."""
    number = 1
    while True:
        elapsed = per_call(fn, number)() * number
        if elapsed >= target / 4 or number >= cap:
            return max(1, min(cap, round(number * target / max(elapsed, 1e-9))))
        number *= 4


def interleaved(
    sample_a: Callable[[], float | dict[str, float]],
    sample_b: Callable[[], float | dict[str, float]],
    pairs: int,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Runs A B A B ... (`pairs` pairs, after `warmup` unrecorded pairs) and
    returns, per metric, the median of the ratios A/B of neighbouring samples,
    their quartiles and the median times of A and B.

    Each B is compared with the A before it and the A after it (ratios
    `A[i]/B[i]` and `A[i+1]/B[i]`), so that being first or second in a pair does
    not bias the ratio, and a slow spell of the machine (other processes) hits
    both sides of a ratio.

    A sample returns seconds, or a dict `{metric: seconds}` (e.g. lower and
    compile of one trace); a plain float is the metric `"time"`. The garbage
    collector is off during each sample (it may run between samples).
    """

    def run(sample):
        gc.disable()
        try:
            value = sample()
        finally:
            gc.enable()
        return value if isinstance(value, dict) else {"time": value}

    for _ in range(warmup):
        run(sample_a)
        run(sample_b)
    gc.collect()
    times_a: dict[str, list[float]] = {}
    times_b: dict[str, list[float]] = {}
    for _ in range(pairs):
        for sample, times in ((sample_a, times_a), (sample_b, times_b)):
            for metric, value in run(sample).items():
                times.setdefault(metric, []).append(value)
    out = {}
    for metric, a in times_a.items():
        b = times_b[metric]
        ratios = [x / y for x, y in zip(a, b)] + [x / y for x, y in zip(a[1:], b)]
        q1, _, q3 = (
            statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        )
        out[metric] = {
            "ratio": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "a": statistics.median(a),
            "b": statistics.median(b),
            "pairs": len(a),
        }
    return out


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def verdict(value: float | None, target: float, exact: bool = False) -> bool | None:
    """Whether a ratio meets its target (`<= target`, or `== target` if exact)."""
    if value is None:
        return None
    return value == target if exact else value <= target
