"""Multi-process training and checkpoints on JAX's distributed engine, on this
machine: `examples/multihost_training.py` runs as two processes (`jax.distributed`
on 127.0.0.1, gloo collectives, 4 CPU devices each, one 2 x 4 mesh), and its
checkpoints restore onto other topologies.

Every run is a fresh set of processes (JAX fixes its devices and its cluster when it
starts), started in a session of its own and ended, all of it, when the run ends or
its time is up. What each run checks, it checks against values computed apart from
it: one-device training of the same models on the whole batch, and the values the
saving processes wrote with numpy.
"""

import contextlib
import fcntl
import os
import pathlib
import re
import sys

import pytest
from _processes import run_together, xla_env


EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "multihost_training.py"
TIMEOUT = 240  # seconds a run may take here; the example's own limit is below it


def _gloo_missing() -> str | None:
    """Why the installed jaxlib cannot run CPU collectives across processes, or
    None. Only a jaxlib that is known to lack gloo skips these tests; anything
    else runs them (and fails loudly if it must)."""
    try:
        from jax._src.lib import _jax
    except ImportError:
        return None
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "the installed jaxlib has no gloo CPU collectives"
    return None


pytestmark = pytest.mark.skipif(
    _gloo_missing() is not None, reason=str(_gloo_missing())
)


def run(*args, timeout=TIMEOUT):
    """Runs the example; returns (exit code, output). The example and every process
    it starts share a new session, killed whole when the run ends or its time is
    up."""
    env = xla_env(JAX_PLATFORMS="cpu")  # the example sets its own device count
    command = [sys.executable, str(EXAMPLE), *args, "--timeout", str(timeout - 30)]
    finished = run_together([command], [env], timeout)
    if finished.timed_out:
        pytest.fail(f"{' '.join(args)} ran past {timeout} s:\n{finished.report()}")
    return finished.codes[0], finished.outputs[0]


def values(pattern, output):
    """Every number the pattern's group matches, one a line of `output`."""
    return [float(v) for v in re.findall(pattern, output)]


MESH_DIFF = r"max \|mesh - one device\| over params and batch_stats: ([0-9.e+-]+)"
LOSS_DIFF = r"max \|restored - saved\|: ([0-9.e+-]+)"


@contextlib.contextmanager
def _locked(path):
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _saved_run(tmp_path_factory, worker_id, name, *args):
    """A training run that saved a checkpoint, made once for all pytest-xdist
    workers (they share the parent of their temporary directories)."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    directory = root / name
    with _locked(root / f"{name}.lock"):
        log, failed = root / f"{name}.txt", root / f"{name}.failed"
        if not log.exists() and not failed.exists():
            code, output = run(*args, "--checkpoint", str(directory))
            # A failed run is not run again by the next worker: it fails too.
            (log if code == 0 else failed).write_text(output)
    assert not failed.exists(), failed.read_text()
    return directory, log.read_text()


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory, worker_id):
    return _saved_run(tmp_path_factory, worker_id, "two_processes", "--processes", "2")


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, worker_id):
    return _saved_run(tmp_path_factory, worker_id, "one_process", "--processes", "1")


def test_two_processes_train_as_one_device_does(two_process_run):
    """Both processes report, for both models, a difference from one-device training
    of at most 1e-5, after data parallel training across the processes and model
    parallel within them; and they saved the checkpoint together."""
    directory, output = two_process_run
    for process in (0, 1):
        lines = [
            ln for ln in output.splitlines() if ln.startswith(f"[process {process}/2]")
        ]
        text = "\n".join(lines)
        assert "to_equinox: loss" in text and "ToLinen block: loss" in text, output
        diffs = values(MESH_DIFF, text)
        assert len(diffs) == 2 and max(diffs) <= 1e-5, output
        assert "saved 17 arrays" in text, output
    # One orbax checkpoint, written by both processes.
    assert (directory / "checkpoint" / "ocdbt.process_0").is_dir()
    assert (directory / "checkpoint" / "ocdbt.process_1").is_dir()


def _check_restore(output, processes, mesh, shards):
    """Each process restored on its mesh, with the kernels' per-device shapes, all
    23 arrays (the two models' variables and the Equinox block taken out of linen)
    bit for bit, and the losses on this mesh within 1e-5 of the saved ones."""
    for process in range(processes):
        prefix = f"[process {process}/{processes}]"
        text = "\n".join(ln for ln in output.splitlines() if ln.startswith(prefix))
        assert f"mesh {mesh}" in text, output
        assert shards in text, output
        assert "restored vs saved: 23 of 23 arrays equal bit for bit" in text, output
        [loss_diff] = values(LOSS_DIFF, text)
        assert loss_diff <= 1e-5, output


# What each of the two processes' restores reports: the mesh, and the kernels'
# slices a device holds.
TWO_PROCESS_MESH = (
    "{'data': 2, 'model': 4}",
    "Dense_0/kernel P(None, 'model') (16, 8) a device, ToLinen_0/linear/weight "
    "P('model', None) (8, 32)",
)


def test_restore_in_two_processes_on_the_same_mesh(two_process_run):
    directory, _ = two_process_run
    code, output = run("--processes", "2", "--restore", str(directory))
    assert code == 0, output
    _check_restore(
        output,
        2,
        *TWO_PROCESS_MESH,
    )


def test_restore_in_one_process_on_one_device(two_process_run):
    directory, _ = two_process_run
    code, output = run("--processes", "1", "--restore", str(directory))
    assert code == 0, output
    _check_restore(
        output,
        1,
        "{'data': 1, 'model': 1}",
        "Dense_0/kernel P(None, 'model') (16, 32) a device, ToLinen_0/linear/weight "
        "P('model', None) (32, 32)",
    )


def test_restore_in_one_process_on_another_eight_device_mesh(two_process_run):
    directory, _ = two_process_run
    code, output = run(
        "--processes",
        "1",
        "--devices",
        "8",
        "--mesh",
        "4x2",
        "--restore",
        str(directory),
    )
    assert code == 0, output
    _check_restore(
        output,
        1,
        "{'data': 4, 'model': 2}",
        "Dense_0/kernel P(None, 'model') (16, 16) a device, ToLinen_0/linear/weight "
        "P('model', None) (16, 32)",
    )


def test_one_process_checkpoint_restores_into_two_processes(one_process_run):
    """`--processes 1` trains on one device (the same numbers, difference 0) and its
    checkpoint restores into the two-process mesh."""
    directory, trained = one_process_run
    assert values(MESH_DIFF, trained) == [0.0, 0.0], trained
    code, output = run("--processes", "2", "--restore", str(directory))
    assert code == 0, output
    _check_restore(
        output,
        2,
        *TWO_PROCESS_MESH,
    )


def _processes_naming(marker):
    """The PIDs of running processes whose command line contains `marker`."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
    return found


def test_the_launcher_ends_every_process_when_the_time_is_up(tmp_path):
    """A run longer than its limit is ended, all its processes with it, and says
    so with exit code 124."""
    marker = str(tmp_path / "late")  # in every process's command line
    command = [sys.executable, str(EXAMPLE), "--processes", "2", "--steps", "100000"]
    command += ["--checkpoint", marker, "--timeout", "3"]
    finished = run_together([command], [xla_env(JAX_PLATFORMS="cpu")], 120)
    assert not finished.timed_out, finished.report()
    assert finished.codes == [124], finished.report()
    assert "timed out after 3 s: every process was ended" in finished.outputs[0]
    assert _processes_naming(marker) == []
    assert not (tmp_path / "late").exists()  # nothing was saved
