"""Child processes for the tests that need fresh ones, bounded in time: each starts
in a session of its own, and every session is killed whole (the child and whatever
it started) when the run ends, when one child fails (the others may wait for it
forever in a collective), or when the time is up."""

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


# XLA's cheap backend settings (no LLVM optimisation), for every program the suite
# compiles: set by conftest.py for the test processes, and passed to the processes
# the tests start. The tests compare two computations compiled alike, so code
# quality does not matter to them, and compiling is most of the suite's time (about
# a third less with these). Benchmarks and examples run outside the suite with
# XLA's defaults.
CHEAP_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def xla_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child JAX process: XLA_FLAGS with the cheap
    settings and, given `devices`, that many CPU devices (replacing any XLA_FLAGS
    of this process), plus `extra`."""
    flags = CHEAP_COMPILE
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags, **extra)


@dataclass
class Finished:
    codes: list[int | None]  # None: still running when the time was up
    outputs: list[str]  # stdout and stderr together, one a child
    timed_out: bool

    def report(self) -> str:
        return "\n".join(
            f"--- child {i} (exit code {code}) ---\n{out}"
            for i, (code, out) in enumerate(zip(self.codes, self.outputs))
        )


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands, envs, timeout, cwd=None) -> Finished:
    children, files = [], []
    deadline = time.monotonic() + timeout
    try:
        for command, env in zip(commands, envs):
            out = tempfile.TemporaryFile(mode="w+")
            files.append(out)
            children.append(
                subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # Unbuffered, so that a killed child's output is in the report.
                    env=dict(env, PYTHONUNBUFFERED="1"),
                    cwd=cwd,
                    start_new_session=True,
                )
            )
        while any(c.poll() is None for c in children):
            if any(c.poll() for c in children) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        codes = [c.poll() for c in children]
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    outputs = []
    for out in files:
        out.seek(0)
        outputs.append(out.read())
        out.close()
    failed = any(code for code in codes if code is not None)
    return Finished(codes, outputs, None in codes and not failed)
