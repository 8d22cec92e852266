"""The benchmark suite (benchmarks/) runs, and the properties it measures that are
deterministic hold exactly: wrapped and native steps compile to the same number of
instructions, and wrapping copies no buffer.

`python benchmarks/run_all.py --quick` runs in a subprocess, started before the
other tests of this module and checked last, so that its compiles overlap theirs.
"""

import json
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
import pytest

import adapters


BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

import _models as M  # noqa: E402
import hlo_count  # noqa: E402


SCRIPTS = (
    "hlo_count",
    "step_time",
    "dispatch",
    "trace_compile",
    "memory",
    "scaling",
    "nnx",
)
COMMON_KEYS = {"benchmark", "environment", "quick", "targets", "holds"}


@pytest.fixture(scope="module", autouse=True)
def quick_run(tmp_path_factory):
    """Starts `run_all.py --quick --out <tmp>` in a subprocess, with a persistent
    compilation cache of its own, so that a program compiled by one script is
    loaded by the next."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    out = tmp / "results"
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(tmp / "compilation_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    process = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process, out
    if process.poll() is None:
        process.kill()
        process.communicate()


# ------------------------------------------------- the same compiled program


@pytest.mark.parametrize("case", list(M.BUILDERS))
def test_train_step_compiles_to_the_same_program(case):
    """Figure 1's property, exactly: as many optimised-HLO instructions, opcode by
    opcode, wrapped as native, for the full train step (and the decode step)."""
    for pair in M.BUILDERS[case](M.QUICK).pairs():
        counts = hlo_count.count_pair(pair)
        assert counts["wrapped"] == counts["native"], (pair.name, counts)
        assert counts["opcode_diff"] == {}, (pair.name, counts)


# ------------------------------------------------------------- no new buffer


def _leaves(tree):
    return [x for x in jtu.tree_leaves(tree) if isinstance(x, jax.Array)]


def _same_buffers(a, b):
    """Same arrays in the same order: the very objects, or the same buffers."""
    a, b = _leaves(a), _leaves(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x is y or x.unsafe_buffer_pointer() == y.unsafe_buffer_pointer()


def _buffer_set(tree):
    return {x.unsafe_buffer_pointer() for x in _leaves(tree)}


def _linen_cases():
    s = M.QUICK
    cnn = M.LinenCNN(s.channels, s.classes)
    x = np.zeros((s.batch, s.image, s.image, 3), np.float32)
    decoder = M.LinenDecoderBlock(s.heads, s.mlp)
    prompt = np.zeros((s.dec_batch, s.max_len, s.d), np.float32)
    return [
        (cnn, M._linen_variables(cnn, x, train=False), {"train_kwarg": "train"}),
        (decoder, M._linen_variables(decoder, prompt), {}),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["cnn", "decoder"])
def test_to_equinox_shares_every_buffer(index):
    module, variables, options = _linen_cases()[index]
    live = len(jax.live_arrays())
    model, state = adapters.to_equinox(module, variables=variables, **options)
    back = model.linen_variables(state)
    assert len(jax.live_arrays()) == live  # nothing allocated
    for collection, tree in variables.items():
        held = (
            model.variables[collection]
            if collection in model.variables
            else state.get(model.state_indices[collection])
        )
        _same_buffers(held, tree)
        _same_buffers(back[collection], tree)  # the round trip too
    assert set(back) == set(variables)


def _equinox_cases():
    s = M.QUICK
    key = jax.random.key(0)
    cnn = M._equinox_model(M.EqxCNN, s.channels, s.classes, key)
    decoder = M._equinox_model(
        M.EqxDecoderBlock, s.d, s.heads, s.mlp, s.dec_batch, s.max_len, key
    )
    return [
        (*cnn, {"vmap_axis": 0, "axis_name": "batch"}),
        (*decoder, {"state_collection": "cache"}),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["cnn", "decoder"])
def test_to_linen_shares_every_buffer(index):
    model, state, options = _equinox_cases()[index]
    model_buffers, state_buffers = _buffer_set(model), _buffer_set(state)
    live = len(jax.live_arrays())
    module, variables = adapters.to_linen(model, state, **options)
    model_back, state_back = module.equinox_model(variables)
    assert len(jax.live_arrays()) == live  # nothing allocated
    state_collection = options.get("state_collection", "batch_stats")
    held_by_model = {c: t for c, t in variables.items() if c != state_collection}
    assert _buffer_set(held_by_model) == model_buffers
    assert _buffer_set(variables[state_collection]) == state_buffers
    # The round trip gives the very arrays back, in the model's own structure.
    _same_buffers(eqx.filter(model_back, eqx.is_array), eqx.filter(model, eqx.is_array))
    _same_buffers(state_back, state)


# ------------------------------------------------------- the scripts run


EXPECTED = {
    "hlo_count": {"sizes", "results", "variants"},
    "step_time": {"sizes", "results"},
    "dispatch": {"results"},
    "trace_compile": {"sizes", "results"},
    "memory": {"sizes", "results"},
    "scaling": {"leaves", "results", "slopes"},
    "nnx": {
        "sizes",
        "hlo",
        "to_nnx_step_time_nnx_jit",
        "to_nnx_step_time_split_merge",
        "to_nnx_step_time_vs_nnx_mlp",
    },
}


def test_run_all_quick(quick_run):
    """Nothing about time is asserted: only that every script ran and wrote its
    JSON, with the keys that benchmarks/README.md reads."""
    process, out = quick_run
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    for name in SCRIPTS:
        document = json.loads((out / f"{name}.json").read_text())
        assert COMMON_KEYS | EXPECTED[name] <= set(document), name
        assert document["quick"] is True
        assert document["benchmark"] == name
        assert document["targets"], name
        for target in document["targets"]:
            assert {"figure", "what", "target", "value", "holds"} <= set(target)
    pairs = [pair.name for pair in M.pairs(M.QUICK)]
    documents = {n: json.loads((out / f"{n}.json").read_text()) for n in SCRIPTS}
    for name in ("hlo_count", "step_time", "trace_compile", "memory"):
        assert list(documents[name]["results"]) == pairs, name
    for result in documents["hlo_count"]["results"].values():
        assert result["wrapped"] == result["native"]
    for result in documents["memory"]["results"].values():
        assert result["equal"]
    for result in documents["trace_compile"]["results"].values():
        assert set(result) == {"trace", "lower", "compile", "total"}
    assert set(documents["scaling"]["slopes"]) == {"ToEquinox", "ToLinen"}
    nnx_hlo = documents["nnx"]["hlo"]
    assert nnx_hlo["wrapped"] == nnx_hlo["native_split_merge"]
    # to_nnx under nnx.jit (and in its functional form) against eqx.filter_jit:
    # the same count and opcodes; the texts differ only by one output copy on
    # each side (nnx.jit returns the RNG key, eqx.filter_jit its marker).
    assert (
        nnx_hlo["to_nnx_nnx_jit"]
        == nnx_hlo["to_nnx_split_merge"]
        == nnx_hlo["to_nnx_native"]
    )
    assert nnx_hlo["to_nnx_opcode_diff"] == {}
    diff = nnx_hlo["to_nnx_instruction_diff"]
    assert all(" copy(" in line for line in diff["only_wrapped"] + diff["only_native"])
    summary = json.loads((out / "run_all.json").read_text())
    assert set(summary["seconds"]) == set(SCRIPTS)
    assert "Figure 1" in stdout and "Figure 6" in stdout and "Targets" in stdout
