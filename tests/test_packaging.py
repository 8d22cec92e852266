"""Packaging: the package is typed (PEP 561) and type-checks, `import adapters` is
this distribution, and a built wheel works in a fresh virtual environment.

mypy runs in a subprocess with this environment's interpreter, on files written to
`tmp_path`, with a cache of its own per test session; it does not use the network.
The wheel test needs the package index (or pip's cache) to fill a fresh virtual
environment: it is skipped, saying so, when the index cannot be reached.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile

import pytest


ROOT = pathlib.Path(__file__).parent.parent
DIST = "flax-equinox-adapters"
USER_PROGRAM = pathlib.Path(__file__).parent / "typing_user_program.py"
MYPY_TIMEOUT = 300
PIP_TIMEOUT = 600

# How a user's project with `mypy --strict` sees the package: its internals are not
# checked (as for any installed package; with the checkout on MYPYPATH they would
# be), and calls of functions without annotations in flax are allowed. mypy names
# an inherited method after the receiver's class, so NNX's `Module.eval`/`train`
# (no annotations in flax) on an `EquinoxToNNX` need the second entry.
USER_MYPY_CONFIG = """\
[mypy]
strict = True
untyped_calls_exclude = flax, adapters._to_nnx.EquinoxToNNX

[mypy-adapters.*]
follow_imports = silent
"""

# The two mistakes: (text of the program, the same text mistaken, mypy's code).
MISTAKES = [
    # An attribute typo on a `ToEquinox`.
    ("= wrapped.variables", "= wrapped.paramz", "attr-defined"),
    # A misspelt keyword-only argument of `to_linen`.
    ("to_linen(model, state, vmap_axis", "to_linen(model, state, vmap_axs", "call-arg"),
]


needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (pip install -e '.[test]')",
)


@pytest.fixture(scope="session")
def mypy_caches(tmp_path_factory):
    """A mypy cache per configuration, shared by the tests of one worker."""
    root = tmp_path_factory.mktemp("mypy-cache")
    return {"user": root / "user", "package": root / "package"}


def _mypy(*args, cwd, cache, mypypath=None):
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    if mypypath is not None:
        env["MYPYPATH"] = str(mypypath)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=MYPY_TIMEOUT,
    )
    return result.returncode, result.stdout + result.stderr


def _with_mistakes(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The program with the two mistakes, and their (line, error code)."""
    expected = []
    for right, wrong, code in MISTAKES:
        assert text.count(right) == 1, right
        text = text.replace(right, wrong)
        expected.append((text[: text.index(wrong)].count("\n") + 1, code))
    return text, expected


@needs_mypy
def test_user_program_type_checks_and_mistakes_are_named(tmp_path, mypy_caches):
    """A `--strict` user program on the public API type-checks cleanly; the same
    program with an attribute typo and a misspelt keyword fails on those lines."""
    text = USER_PROGRAM.read_text()
    (tmp_path / "user_program.py").write_text(text)
    mistaken, expected = _with_mistakes(text)
    (tmp_path / "user_mistakes.py").write_text(mistaken)
    (tmp_path / "mypy.ini").write_text(USER_MYPY_CONFIG)

    rc, out = _mypy(
        "--config-file",
        "mypy.ini",
        "user_program.py",
        "user_mistakes.py",
        cwd=tmp_path,
        cache=mypy_caches["user"],
        # The checkout: mypy does not see an editable install's import hook.
        mypypath=ROOT,
    )
    errors = re.findall(r"^(\S+\.py):(\d+): error: .*\[([\w-]+)\]$", out, flags=re.M)
    assert not [e for e in errors if e[0] == "user_program.py"], out
    assert sorted((int(line), code) for _, line, code in errors) == expected, out
    assert all(path == "user_mistakes.py" for path, _, _ in errors), out
    assert rc == 1 and "Found 2 errors in 1 file" in out, out


@needs_mypy
def test_to_equinox_of_an_nnx_module_is_typed(tmp_path, mypy_caches):
    (tmp_path / "nnx_door.py").write_text(
        "import jax.numpy as jnp\n"
        "from flax import nnx\n\n"
        "import adapters\n\n\n"
        "def f() -> nnx.Module:\n"
        "    linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))\n"
        "    model, state = adapters.to_equinox(linear)\n"
        "    nnx_model: adapters.NNXToEquinox = model\n"
        "    out, state = nnx_model(jnp.ones(3), state)\n"
        "    return nnx_model.nnx_module(state)\n"
    )
    (tmp_path / "mypy.ini").write_text(USER_MYPY_CONFIG)
    rc, out = _mypy(
        "--config-file",
        "mypy.ini",
        "nnx_door.py",
        cwd=tmp_path,
        cache=mypy_caches["user"],
        mypypath=ROOT,
    )
    assert rc == 0, out


@needs_mypy
def test_package_type_checks(mypy_caches):
    """`mypy -p adapters` with the `[tool.mypy]` configuration of pyproject.toml."""
    rc, out = _mypy(
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "-p",
        "adapters",
        cwd=ROOT,
        cache=mypy_caches["package"],
    )
    assert rc == 0 and "Success: no issues found" in out, out
    assert "unused section" not in out, out


# Run in a fresh process from a directory outside the checkout (so that the current
# directory does not shadow the installed package): where `import adapters` comes
# from, by the distribution's own metadata. Prints one line, "which: {json}".
WHICH_ADAPTERS = """\
import importlib.metadata as md, json, os, sys
import adapters

dist = md.distribution("flax-equinox-adapters")
init = os.path.realpath(adapters.__file__)
listed = [f for f in dist.files or () if str(f) == "adapters/__init__.py"]
direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
print("which:", json.dumps({
    "file": init,
    "prefix": os.path.realpath(sys.prefix),
    "version": adapters.__version__,
    "metadata_version": dist.version,
    "listed_file": os.path.realpath(dist.locate_file(listed[0])) if listed else None,
    "editable": direct_url.get("dir_info", {}).get("editable", False),
    "url": direct_url.get("url"),
    "top_level": md.packages_distributions().get("adapters"),
}))
"""


def _run(python, script, cwd) -> tuple[dict, str]:
    """Runs `script` after WHICH_ADAPTERS: (where adapters comes from, the output)."""
    result = subprocess.run(
        [python, "-c", WHICH_ADAPTERS + script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("which: ")]
    return json.loads(line.removeprefix("which: ")), result.stdout


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_import_adapters_is_this_distribution(tmp_path):
    """`import adapters` is flax-equinox-adapters (not AdapterHub's `adapters`), and
    `adapters.__version__` is the installed distribution's version, which is
    pyproject.toml's (reinstall after changing it)."""
    which, _ = _run(sys.executable, "", tmp_path)
    assert set(which["top_level"]) == {DIST}, which  # no other distribution claims it
    assert which["version"] == which["metadata_version"] == _project_version(), which
    if which["editable"]:  # pip install -e: the files are the checkout's
        assert which["url"] == ROOT.resolve().as_uri(), which
        assert which["file"] == str((ROOT / "adapters" / "__init__.py").resolve())
    else:  # an ordinary install: the module is the file the distribution lists
        assert which["file"] == which["listed_file"], which
    assert importlib.metadata.version(DIST) == which["version"]


_IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "site",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
)
_OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|"
    r"Temporary failure in name resolution|Network is unreachable|"
    r"Could not fetch URL|ProxyError|ConnectTimeout"
)

# Then, in the fresh environment: the quickstart, with few steps.
RUN_QUICKSTART = """\
import runpy

sys.argv = ["quickstart.py", "--steps", "3"]
runpy.run_path("quickstart.py", run_name="__main__")
"""


def _pip(*args, timeout=PIP_TIMEOUT):
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = result.stdout + result.stderr
    if result.returncode and _OFFLINE.search(out):
        pytest.skip(f"the package index cannot be reached: {_OFFLINE.search(out)[0]}")
    assert result.returncode == 0, out
    return out


@needs_mypy
def test_built_wheel_works_in_a_fresh_environment(tmp_path):
    """The wheel holds the package, `py.typed` and the licence, nothing else; with
    its `examples` extra in a fresh virtual environment, the quickstart runs on the
    installed package, and mypy type-checks the user program through `py.typed`."""
    timings, last = {}, [time.perf_counter()]

    def lap(name):  # printed at the end (pytest -s shows it)
        timings[name], last[0] = time.perf_counter() - last[0], time.perf_counter()

    # Build from a copy of the tree (as a clean checkout), not in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORED)
    _pip(
        "wheel", "--no-deps", str(src), "-w", str(tmp_path / "wheelhouse"), timeout=300
    )
    (wheel,) = (tmp_path / "wheelhouse").glob("*.whl")
    lap("build")

    version = _project_version()
    dist_info = f"flax_equinox_adapters-{version}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        licence = zf.read(f"{dist_info}/licenses/LICENSE")
    sources = {p.relative_to(src).as_posix() for p in (src / "adapters").rglob("*.py")}
    assert sources and sources <= names, sources - names
    assert "adapters/py.typed" in names
    assert licence == (ROOT / "LICENSE").read_bytes()
    assert "Apache License" in licence.decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert f"Version: {version}" in metadata
    outside = {n for n in names if not n.startswith(("adapters/", f"{dist_info}/"))}
    assert not outside, outside  # no tests/, examples/, docs/, benchmarks/
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    # A fresh environment: no pip of its own (this environment's pip installs into
    # it), no byte-compilation at install (a third of the time), and the versions
    # of this environment as constraints, so that pip's cache serves them.
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    python = str(venv / "bin" / "python")
    pins = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower() != DIST
    )
    (tmp_path / "constraints.txt").write_text("\n".join(pins) + "\n")
    _pip(
        "--python",
        python,
        "install",
        "--quiet",
        "--no-compile",
        "--constraint",
        str(tmp_path / "constraints.txt"),
        f"{wheel}[examples]",
    )
    lap("install")

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.py", run)
    which, out = _run(python, RUN_QUICKSTART, run)
    assert which["prefix"] == str(venv.resolve()), which
    assert which["file"].startswith(str(venv.resolve()) + os.sep), which
    assert which["file"] == which["listed_file"] and not which["editable"], which
    assert which["version"] == which["metadata_version"] == version, which
    assert set(which["top_level"]) == {DIST}, which
    assert "equal to native Equinox" in out, out
    lap("run")

    # PEP 561: mypy finds the installed package's annotations through `py.typed`
    # (without it: "module is installed, but missing library stubs or py.typed").
    shutil.copy(USER_PROGRAM, run)
    (run / "mypy.ini").write_text(USER_MYPY_CONFIG)
    rc, out = _mypy(
        "--config-file",
        "mypy.ini",
        "--python-executable",
        python,
        "typing_user_program.py",
        cwd=run,
        cache=tmp_path / "mypy-cache",
    )
    assert rc == 0 and "Success: no issues found" in out, out
    lap("mypy")
    print("wheel test, seconds:", {k: round(v, 1) for k, v in timings.items()})
