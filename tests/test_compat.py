"""The compatibility matrix (`docs/compatibility.md`): every row runs here, a real
package's model wrapped by the adapters against the same model run natively on the
same variables (`benchmarks/compat/checks.py`).

A row passes when each check's difference is within the tolerance, or when the
adapters refuse the model with an `AdapterError` (the page says why); any other
failure fails here. Each result must also agree with the recorded results file,
`benchmarks/results/compat.json`, from which `benchmarks/compat_matrix.py` writes
the page: every check's pass/fail, the package version, the model, what the row
exercises and its note (not the differences themselves, which move in the last
bits with XLA's compile settings). The page must be what that script writes from
the record, so it cannot be edited by hand, and a row whose outcome or text
changes fails here until the matrix is rerun.

The last tests show that the checks can fail: a wrapper holding other values, or
training in inference, or a state that a training call leaves as it was.
"""

import pathlib
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adapters


BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

from compat import checks as checks_module, matrix  # noqa: E402
from compat.checks import (  # noqa: E402
    compares_something,
    linen_checks,
    LinenCase,
    max_abs_diff,
    run,
)


GROUPS = matrix.specs()
SPECS = {spec.id: spec for _, spec in GROUPS}
RECORD = matrix.load()
RECORDED = {row.id: row for row in RECORD["rows"]}


def _statuses(row):
    return {name: c.ok for name, c in row.checks.items()}


def _jax_globals():
    """JAX's process-wide settings that a package could change when imported."""
    return (
        jax.config.jax_enable_x64,
        str(jax.sharding.get_abstract_mesh()),
        jax.config.jax_default_matmul_precision,
    )


@pytest.mark.parametrize("row_id", list(SPECS))
def test_row(row_id):
    spec = SPECS[row_id]
    before = _jax_globals()
    with warnings.catch_warnings():
        # The packages' own deprecation notices (transformers deprecates its Flax
        # classes); the adapters' code runs under the suite's warnings-as-errors
        # elsewhere.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        row = run(spec)
    # netket, imported, would switch on 64-bit mode and set a global mesh: the
    # rows import packages so that the rest of the suite keeps JAX as it was.
    assert _jax_globals() == before
    failures = {
        name: (c.max_diff, c.detail) for name, c in row.checks.items() if not c.ok
    }
    if row.unsupported:
        assert RECORDED[row_id].unsupported == row.unsupported
    else:
        assert not failures, failures
    assert _statuses(row) == _statuses(RECORDED[row_id]), (
        "the result differs from benchmarks/results/compat.json: rerun "
        f"`python benchmarks/compat_matrix.py --only {row_id}`"
    )
    recorded = RECORDED[row_id]
    # What the page shows besides the checks is the record's too.
    assert (row.version, row.model, row.exercises, row.note) == (
        recorded.version,
        recorded.model,
        recorded.exercises,
        recorded.note,
    ), f"rerun `python benchmarks/compat_matrix.py --only {row_id}`"


def test_every_row_is_recorded_and_nothing_else():
    assert list(RECORDED) == list(SPECS)


def test_page_is_written_from_the_record():
    assert matrix.PAGE.read_text() == matrix.render(RECORD, GROUPS), (
        "docs/compatibility.md is not what the record gives: run "
        "`python benchmarks/compat_matrix.py --page`"
    )


# ---------------------------------------------------------------- the checks fail


def test_max_abs_diff_compares_non_finite_entries():
    nan, inf = float("nan"), float("inf")
    assert max_abs_diff(np.array([nan, 1.0]), np.array([nan, 1.5])) == 0.5
    assert max_abs_diff(np.array([inf, 1.0]), np.array([inf, 1.0])) == 0.0
    assert max_abs_diff(np.array([inf, 1.0]), np.array([-inf, 1.0])) == inf
    assert max_abs_diff(np.array([nan, 1.0]), np.array([1.0, 1.0])) == inf
    assert max_abs_diff(np.array([1 + 1j]), np.array([1 + 2j])) == 1.0
    assert max_abs_diff({"a": np.zeros(2)}, {"b": np.zeros(2)}) == inf
    assert not compares_something({"a": np.array([nan, 0.0])})
    assert compares_something({"a": np.array([nan, 0.5])})


class _Net(nn.Module):
    """Dropout and BatchNorm, switched by a keyword that the adapters do not know
    by its name (they find `train`, `deterministic`, ... by themselves), training
    by default."""

    @nn.compact
    def __call__(self, x, stochastic: bool = True):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not stochastic)(x)
        x = nn.Dropout(0.5, deterministic=not stochastic)(x)
        return nn.Dense(2)(x)


def _case(module=None, **kwargs):
    x = jax.random.normal(jax.random.key(1), (4, 3))
    options = dict(mode=("stochastic", False), mutable=("batch_stats",))
    return LinenCase(module or _Net(), args=(x,), **{**options, **kwargs})


def _statuses_of(checks):
    return {name: (c.ok, c.detail) for name, c in checks.items()}


def test_the_checks_pass_on_the_adapter():
    checks, _ = linen_checks(_case(), jax.random.key(0))
    assert all(c.ok for c in checks.values()), _statuses_of(checks)
    assert set(checks) == {"forward", "gradient", "optimiser", "state"}


def test_the_checks_fail_when_the_wrapper_holds_other_values(monkeypatch):
    original = checks_module.wrap

    def wrap(case, variables):
        return original(case, jax.tree.map(lambda x: x + 1e-3, variables))

    monkeypatch.setattr(checks_module, "wrap", wrap)
    checks, _ = linen_checks(_case(), jax.random.key(0))
    assert not checks["forward"].ok and not checks["gradient"].ok
    assert not checks["optimiser"].ok and not checks["state"].ok


def test_the_checks_fail_when_the_wrapper_trains_in_inference(monkeypatch):
    # Without `train_kwarg="stochastic"`, the wrapper in inference calls the
    # module with its default, stochastic=True: dropout on, and the running
    # averages written.
    def wrap(case, variables):
        return adapters.to_equinox(case.module, variables=variables)

    monkeypatch.setattr(checks_module, "wrap", wrap)
    checks, _ = linen_checks(_case(), jax.random.key(0))
    assert not checks["forward"].ok
    assert checks["forward"].detail == "the state changed in inference"


def test_a_state_that_does_not_change_fails_the_state_check():
    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, x, stochastic: bool = True):
            self.variable("batch_stats", "scale", jnp.ones, (3,))
            return nn.Dense(2)(x)

    checks, _ = linen_checks(_case(module=Fixed()), jax.random.key(0))
    assert not checks["state"].ok
    assert checks["state"].detail == "the state did not change natively"


def test_a_mutable_collection_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match=r"mutable \['stats'\] are not in init"):
        linen_checks(_case(mutable=("stats",)), jax.random.key(0))
