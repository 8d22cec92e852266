"""The documentation site: every Python block of every page runs, every error the
FAQ shows is the error the code raises, every public name is in the API
reference, and `mkdocs build --strict` passes.

Conventions a page may use (HTML comments, not rendered by mkdocs):

- `<!-- docs-test: devices=8 -->` anywhere in a page: the page runs in a fresh
  process with that many CPU devices (JAX fixes the device count at start-up).
- `<!-- docs-test: processes=2 devices=4 -->` on a line of its own: the blocks
  after it are a program of their own, run in that many fresh processes with that
  many CPU devices each, which may form one JAX cluster: each gets
  `COORDINATOR_ADDRESS` (a free port on 127.0.0.1), `NUM_PROCESSES` and
  `PROCESS_ID` in its environment, and all share one working directory.
- `<!-- docs-test: raises ExceptionName -->` right before a python block: the block
  must raise that exception (a name from `adapters`, or a builtin); when the next
  fenced block is a ```text block, it is the message, where `...` stands for any
  text, and the raised message must match it (the text may start as a traceback's
  last line does, e.g. `adapters.AdapterError: `).
- `<!-- docs-test: skip -->` right before a python block: the block is not run
  (for a fragment that shows a signature or needs hardware this machine lacks);
  a test counts these so that they stay few.
"""

import builtins
import importlib.util
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest
from _processes import free_port, run_together, xla_env

import adapters


ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))

_FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?"
    r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$",
    flags=re.M | re.S,
)


@dataclass
class Block:
    lang: str
    body: str
    directive: str  # "", "skip", "raises Name"
    line: int


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    return [
        Block(
            m["lang"],
            m["body"],
            (m["directive"] or "").strip(),
            text.count("\n", 0, m.start("body")) + 1,
        )
        for m in _FENCE.finditer(text)
    ]


def devices(page: str) -> int | None:
    m = re.search(r"<!--\s*docs-test:\s*devices=(\d+)\s*-->", (DOCS / page).read_text())
    return int(m[1]) if m else None


@dataclass
class Cluster:
    processes: int
    devices: int
    line: int  # the marker's: the blocks below it form the cluster's program


def cluster(page: str) -> Cluster | None:
    text = (DOCS / page).read_text()
    m = re.search(
        r"^<!--\s*docs-test:\s*processes=(\d+)\s+devices=(\d+)\s*-->$", text, re.M
    )
    if not m:
        return None
    return Cluster(int(m[1]), int(m[2]), text.count("\n", 0, m.start()) + 1)


def _exception(name: str) -> type[BaseException]:
    found = getattr(adapters, name, None) or getattr(builtins, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), name
    return found


def _message_matches(pattern: str, message: str) -> bool:
    """`pattern`, with `...` as a wildcard and whitespace-insensitive, matches the
    start of `message` (a pattern may end early; one starting with `...` may skip
    the message's start)."""

    def norm(s):
        return " ".join(s.split())

    pieces = [re.escape(norm(p)) for p in norm(pattern).split("...")]
    return re.match(r".*?".join(pieces), norm(message), flags=re.S) is not None


def _without_exception_name(shown: str, err: BaseException) -> str:
    """The message shown, without a traceback's `adapters.AdapterError: ` (or
    `ValueError: `) in front."""
    name = type(err).__name__
    for prefix in (f"adapters.{name}: ", f"{name}: "):
        if shown.lstrip().startswith(prefix):
            return shown.lstrip().removeprefix(prefix)
    return shown


def run_page(page: str, first: int = 0, last: float = float("inf")) -> int:
    """Runs the page's python blocks (those between lines `first` and `last`) in
    order in one namespace; returns how many ran. Failures raise with the page and
    the block's line."""
    found = [b for b in blocks(page) if first <= b.line <= last]
    namespace: dict = {"__name__": f"docs_{page}"}
    ran = 0
    for i, block in enumerate(found):
        if block.lang != "python" or block.directive == "skip":
            continue
        where = f"{page}:{block.line}"
        code = compile(block.body, where, "exec")
        if block.directive.startswith("raises"):
            expected = _exception(block.directive.split()[1])
            with pytest.raises(expected) as info:
                exec(code, namespace)
            following = found[i + 1] if i + 1 < len(found) else None
            if following is not None and following.lang == "text":
                shown = _without_exception_name(following.body, info.value)
                assert _message_matches(shown, str(info.value)), (
                    f"{where}: the message shown is not the message raised.\n"
                    f"shown:\n{following.body}\nraised:\n{info.value}"
                )
        else:
            assert not block.directive, (
                f"{where}: unknown directive {block.directive!r}"
            )
            exec(code, namespace)
        ran += 1
    return ran


_RUN_PAGE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import test_docs; "
    "a = sys.argv; print('ran', test_docs.run_page(a[2], int(a[3]), float(a[4])))"
)


def _page_command(page, first=0, last=float("inf")):
    here = str(pathlib.Path(__file__).parent)
    return [sys.executable, "-c", _RUN_PAGE, here, page, str(first), str(last)]


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, tmp_path, monkeypatch):
    # Nothing a page writes lands in the repository, or outside tmp_path: relative
    # paths and `tempfile.mkdtemp()` (also in the pages' own processes).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    n, split = devices(page), cluster(page)
    if n is None and split is None:
        run_page(page)
        return
    last = split.line if split else float("inf")
    if n is not None:
        result = subprocess.run(
            _page_command(page, 0, last),
            env=xla_env(n),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        run_page(page, 0, last)
    if split is not None:
        _run_cluster(page, split, tmp_path)


def _run_cluster(page, split, tmp_path):
    """The blocks below the marker, as one program in `split.processes` fresh
    processes (see the module's docstring)."""
    base = xla_env(split.devices, JAX_PLATFORMS="cpu")
    base.update(
        COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        NUM_PROCESSES=str(split.processes),
    )
    envs = [dict(base, PROCESS_ID=str(i)) for i in range(split.processes)]
    command = _page_command(page, split.line)
    finished = run_together([command] * split.processes, envs, 300, cwd=tmp_path)
    assert not finished.timed_out, f"past 300 s:\n{finished.report()}"
    assert finished.codes == [0] * split.processes, finished.report()
    ran = [re.search(r"^ran (\d+)$", out, re.M) for out in finished.outputs]
    assert all(m and int(m[1]) > 0 for m in ran), finished.report()


def test_code_blocks_fit_the_page():
    """Every line of every code block (python, text, bash) is at most 88 columns,
    the width the site shows without a scroll bar."""
    too_long = [
        (page, block.line + i, len(line))
        for page in PAGES
        for block in blocks(page)
        for i, line in enumerate(block.body.splitlines(), start=1)
        if len(line) > 88
    ]
    assert not too_long, too_long


def test_directives_are_known_and_skips_are_few():
    skipped = []
    for page in PAGES:
        for block in blocks(page):
            if block.directive == "skip":
                skipped.append(f"{page}:{block.line}")
            elif block.directive:
                assert block.directive.startswith("raises "), (page, block.line)
                assert block.lang == "python", (page, block.line)
    assert len(skipped) <= 3, skipped


def test_message_matching():
    assert _message_matches("a ... c", "a b\n  c")
    assert not _message_matches("a ... c", "c b a")
    assert not _message_matches("b", "a b")  # anchored at the start


def _public_names() -> list[str]:
    names = [f"adapters.{n}" for n in adapters.__all__ if n != "testing"]
    names += [f"adapters.testing.{n}" for n in adapters.testing.__all__]
    return names


def test_every_public_name_is_in_the_api_reference():
    reference = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^:::\s+([\w.]+)", reference, flags=re.M))
    missing = [n for n in _public_names() if n not in documented]
    assert not missing, f"not in docs/api.md: {missing}"
    unknown = [n for n in documented if n not in _public_names()]
    assert not unknown, f"docs/api.md documents what is not public: {unknown}"


def test_every_page_is_in_the_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    missing = [p for p in PAGES if p not in config]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--site-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").exists()
    assert (tmp_path / "api" / "index.html").exists()


def test_reliability_page_names_tests_that_exist():
    """docs/reliability.md cites a test for every case: each cited file exists and
    each cited test function is defined in it."""
    page = (DOCS / "reliability.md").read_text()
    cited = re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?`", page)
    assert len(cited) >= 20, cited
    for path, name in cited:
        source = (ROOT / path).read_text()
        if name:
            assert re.search(rf"^def {name}\(", source, flags=re.M), (path, name)
