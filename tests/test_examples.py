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


def test_linen_with_equinox_block(capsys):
    first, last, diff = _load("linen_with_equinox_block").main(steps=30)
    assert last < first  # it trains
    # The block taken back to Equinox computes what it computed inside linen.
    assert diff < 1e-6
    assert "ToLinen_0/linear/weight" in capsys.readouterr().out
