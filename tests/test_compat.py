"""The compatibility matrix (`docs/compatibility.md`): every row runs here, a real
package's model wrapped by the adapters against the same model run natively on the
same variables (`benchmarks/compat/checks.py`).

A row passes when each check's difference is within the tolerance, or when the
adapters refuse the model with an `AdapterError` (the page says why); any other
failure fails here. Each result must also agree with the recorded results file,
`benchmarks/results/compat.json`, from which `benchmarks/compat_matrix.py` writes
the page, and the page must be what that script writes from the record: the page
can neither go stale nor be edited by hand.
"""

import pathlib
import sys
import warnings

import jax
import pytest


BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

from compat import matrix  # noqa: E402
from compat.checks import run  # noqa: E402


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
