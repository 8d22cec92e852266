"""The compatibility matrix: runs every row of `benchmarks/compat/` (real packages'
models, wrapped, against the same models run natively), records the results in
`benchmarks/results/compat.json` and writes `docs/compatibility.md` from them.

    python benchmarks/compat_matrix.py                 # every row, then the page
    python benchmarks/compat_matrix.py --only ID ...   # these rows, then the page
    python benchmarks/compat_matrix.py --page          # the page from the record

The test suite runs every row too (`tests/test_compat.py`), checks that each result
agrees with the record, and that the page is the one this script writes from it.
"""

import argparse
import sys
import time
import warnings

from compat import matrix
from compat.checks import run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="row ids to run")
    parser.add_argument("--page", action="store_true", help="only write the page")
    args = parser.parse_args(argv)
    groups = matrix.specs()
    if args.page:
        matrix.PAGE.write_text(matrix.render(matrix.load(), groups))
        return 0

    known = {spec.id for _, spec in groups}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"no rows {unknown}; the rows are {sorted(known)}")
    record = matrix.load() if args.only and matrix.RESULTS.exists() else None
    rows = {row.id: row for row in record["rows"]} if record else {}
    seconds = dict(record["seconds"]) if record else {}
    for _, spec in groups:
        if args.only and spec.id not in args.only:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # third-party deprecation notices
            row = run(spec)
        seconds[spec.id] = round(time.perf_counter() - start, 1)
        rows[spec.id] = row
        marks = " ".join(
            f"{name}={'ok' if c.ok else 'FAIL'}" for name, c in row.checks.items()
        )
        print(f"{spec.id:<40} {seconds[spec.id]:>6.1f} s  {marks}", flush=True)
    ordered = [rows[spec.id] for _, spec in groups if spec.id in rows]
    matrix.save(ordered, {row.id: seconds[row.id] for row in ordered})
    matrix.PAGE.write_text(matrix.render(matrix.load(), groups))
    failing = [row.id for row in ordered if not row.passed() and not row.unsupported]
    print(f"{len(ordered)} rows, {len(failing)} failing: {failing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
