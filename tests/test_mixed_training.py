"""examples/mixed_training.py: the full default run reaches its accuracy on both
sides, and the Equinox side (linen backbone inside an Equinox classifier) and the
pure linen side end with the same parameters."""

import importlib.util
import pathlib

import pytest


EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "mixed_training.py"


def _load():
    spec = importlib.util.spec_from_file_location("mixed_training", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mixed_training_default_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing the example writes lands in the repository
    plot = tmp_path / "mixed_training.png"
    # The default configuration, in full; only the progress bar is off.
    result = _load().main(plot_path=plot, progress=False)

    # Both sides learn the digits.
    assert result["equinox_accuracy"] >= 0.95
    assert result["linen_accuracy"] >= 0.95
    for side in (result["equinox"], result["linen"]):
        assert side.loss[-1] < 0.2 * side.loss[0]

    # The same computation on both sides: same batches, same dropout keys, same
    # initial weights. Measured here: bit-identical (0.0) after 264 steps; the
    # tolerance leaves room for float rounding on another CPU or XLA version.
    assert result["param_diff"] <= 1e-5
    linen = result["linen"]
    assert result["equinox"].loss == pytest.approx(linen.loss, rel=1e-4)
    # At most one of the 360 test images may be classified differently.
    assert result["equinox"].accuracy == pytest.approx(linen.accuracy, abs=1.5 / 360)

    assert result["plot"] == plot
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # two panels of curves, not an empty canvas

    printed = capsys.readouterr().out
    assert "final test accuracy" in printed
    assert "max |equinox - linen| over params and batch_stats" in printed
