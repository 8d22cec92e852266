"""The compatibility matrix: every row's spec, the recorded results file, and the
documentation page written from it."""

import importlib
import importlib.metadata
import json
import pathlib

from .checks import CHECKS, Row, Spec, TOLERANCE


ROOT = pathlib.Path(__file__).parent.parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "compat.json"
PAGE = ROOT / "docs" / "compatibility.md"

# The modules holding rows, in the page's order, with the heading of their table.
GROUPS = [
    ("Hugging Face transformers: text encoders", ["hf_encoders"]),
    ("Hugging Face transformers: vision, audio and multimodal", ["hf_vision"]),
    ("Hugging Face transformers: causal language models", ["hf_causal"]),
    (
        "Hugging Face transformers: encoder-decoders",
        ["hf_seq2seq_bart", "hf_seq2seq_t5"],
    ),
    ("Other packages' linen models, inside Equinox", ["linen_packages"]),
    ("Equinox packages' models, inside linen", ["equinox_packages"]),
]
VERSIONS = ["jax", "jaxlib", "flax", "equinox", "optax"]


def specs() -> list[tuple[str, Spec]]:
    """(group heading, spec) for every row, in the page's order."""
    found = []
    for heading, modules in GROUPS:
        for name in modules:
            module = importlib.import_module(f"{__package__}.{name}")
            found += [(heading, spec) for spec in module.ROWS]
    ids = [spec.id for _, spec in found]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicated, f"rows with the same id: {duplicated}"
    return found


def environment() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in VERSIONS}


def save(rows: list[Row], seconds: dict[str, float]) -> None:
    data = {
        "environment": environment(),
        "tolerance": TOLERANCE,
        "rows": [row.as_json() for row in rows],
        "seconds": seconds,  # per row, on the machine that recorded them
    }
    RESULTS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def load() -> dict:
    data = json.loads(RESULTS.read_text())
    data["rows"] = [Row.from_json(row) for row in data["rows"]]
    return data


def _cell(row: Row, check: str) -> str:
    c = row.checks.get(check)
    if c is None:
        return "—"
    mark = "✔" if c.ok else "✘"
    if c.max_diff is None:
        return f"{mark} error"
    diff = "0" if c.max_diff == 0 else f"{c.max_diff:.1e}"
    return f"{mark} {diff}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _notes(row: Row) -> str:
    parts = []
    if row.note:
        parts.append(row.note)
    if row.unsupported:
        parts.append(f"Unsupported: `{row.unsupported}`")
    for name, c in row.checks.items():
        if not c.ok and c.detail:
            parts.append(f"{name}: {c.detail}")
    return _escape(" ".join(parts))


def render(data: dict, groups: list[tuple[str, Spec]]) -> str:
    """The page, from recorded results and the specs' grouping."""
    rows = {row.id: row for row in data["rows"]}
    env = data["environment"]
    passing = sum(row.passed() for row in rows.values())
    unsupported = sum(bool(row.unsupported) for row in rows.values())
    packages = sorted({f"{row.package} {row.version}" for row in rows.values()})
    lines = [
        "# Compatibility",
        "",
        "<!-- Written by `python benchmarks/compat_matrix.py` from",
        "benchmarks/results/compat.json; do not edit by hand. -->",
        "",
        "Does the adapter wrap *my* model exactly? Each row below is a model shipped",
        "by a real package, built with a tiny random configuration (nothing is",
        "downloaded), wrapped by the adapters and checked against the same model run",
        "natively on the same variables, in the test suite (`tests/test_compat.py`).",
        f"{len(rows)} models, of which {passing} pass every check"
        + (
            f" and {unsupported} are refused with an `AdapterError` that says why."
            if unsupported
            else "; none is refused."
        ),
        "",
        "The checks, each the largest absolute difference between the wrapped and",
        f"the native computation (✔ when at most {data['tolerance']:g}):",
        "",
        "- **Forward**: outputs in training (dropout keys through",
        "  `adapters.linen_rngs`) and in inference (`eqx.nn.inference_mode`),",
        "  where the wrapper must also leave its state as it was.",
        "- **Gradient**: of a loss of every float output, w.r.t. the parameters.",
        "- **Optimiser**: the parameters after 3 Adam steps.",
        "- **State**: the state collections a training call updates (e.g.",
        "  `batch_stats`, flaxmodels' `moving_stats`), after the first step and",
        "  after the last.",
        "- **Decode**: greedy decoding token by token with the decode cache threaded",
        "  through the `eqx.nn.State`, under `eqx.filter_jit` and under",
        "  `jax.lax.scan`, against linen's cached decoding: the same tokens, the",
        "  logits within the tolerance.",
        "- **Key**: for an Equinox model that takes a `key`, the key `ToLinen` draws",
        "  from linen's rng stream reproduces the native call (and another key",
        "  changes the output).",
        "",
        "— means the check does not apply to the model. Recorded with "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + "; the packages: "
        + ", ".join(packages)
        + ".",
        "",
    ]
    header = "| Model | Package | Exercises | "
    header += " | ".join(c.title() for c in CHECKS) + " | Notes |"
    rule = "|" + "---|" * (len(CHECKS) + 4)
    seen = []
    for heading, spec in groups:
        if heading not in seen:
            seen.append(heading)
            lines += ["", f"## {heading}", "", header, rule]
        row = rows[spec.id]
        cells = [
            f"`{row.id}` ({row.model})",
            f"{row.package} {row.version}",
            _escape(", ".join(row.exercises)),
            *(_cell(row, c) for c in CHECKS),
            _notes(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
