"""The examples run, and what they print as a check really holds."""

import importlib.util
import pathlib


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    diff = _load("quickstart").main(steps=3)
    # Wrapped training and native linen training stay together, step by step.
    assert diff < 1e-6
    printed = capsys.readouterr().out
    assert "equinox loss" in printed and "linen loss" in printed
    # The other direction: assert_equivalent raised nothing, and said so.
    assert "updated collections ['batch_stats']" in printed
    assert "equal to native Equinox" in printed


def test_linen_with_equinox_block(capsys):
    first, last, diff = _load("linen_with_equinox_block").main(steps=30)
    assert last < first  # it trains
    # The block taken back to Equinox computes what it computed inside linen.
    assert diff < 1e-6
    assert "ToLinen_0/linear/weight" in capsys.readouterr().out


def test_nnx_with_equinox_block(capsys):
    first, last, param_diff, eval_diff = _load("nnx_with_equinox_block").main(steps=5)
    assert last < first  # it trains
    # Trained side by side with the same model written natively in Equinox (same
    # weights, batches and dropout keys): the same parameters, statistics and
    # evaluation (model.eval() against eqx.nn.inference_mode).
    assert param_diff < 1e-5 and eval_diff < 1e-5
    printed = capsys.readouterr().out
    assert "block/params/up/weight" in printed and "native Equinox" in printed


def test_sharded_training():
    """Needs 8 devices, fixed when JAX starts: run in a fresh process."""
    import re
    import subprocess
    import sys

    from _processes import xla_env

    env = xla_env(8)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sharded_training.py"), "--steps", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "P(None, 'model')" in out and "P('data',)" in out
    diff = float(
        re.search(r"one device\| over the parameters: ([0-9.e+-]+)", out).group(1)
    )
    assert diff < 1e-5


def test_gradual_migration(capsys):
    inside, outside = _load("gradual_migration").main(quick=True)
    # Every part was replaced in both migrations, each check passed
    # (assert_equivalent raises otherwise)...
    parts = ["embed", "norm", "attn", "mixer", "head"]
    assert inside == parts and outside == parts
    printed = capsys.readouterr().out
    # ...the linen shell holds only Equinox layers (through ToLinen), and the
    # outside-in model holds no linen module.
    assert "'embed': 'Linear', 'norm': 'LinenBatchNorm'" in printed
    assert "pure Equinox" in printed
