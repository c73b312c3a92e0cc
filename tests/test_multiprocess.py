"""Two processes on localhost (jax.distributed, CPU collectives) = one process, whole batch.

Starts two workers (``tests/workers/mp_worker.py``) that join one JAX job through a
coordinator on 127.0.0.1 at a free port, each holding half of a batch, and a third that
runs the same bogc step on the whole batch alone. The statistics, bogc diagnostics,
updates and new parameters of the two-process step (under ``jit`` with sharded global
arrays, and under ``shard_map`` with ``axis_name``) must equal the single-process ones.
Loopback only; every process is killed after ``TIMEOUT_S``.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "mp_worker.py")
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    # One CPU device per process: drop any forced device count.
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def hostname_is_loopback() -> bool:
    """gloo's TCP pairs bind to the address of the machine's host name."""
    try:
        return socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        return False


@pytest.mark.skipif(
    not hostname_is_loopback(),
    reason="the host name does not resolve to a loopback address, so the "
    "gloo collectives would leave the loopback interface",
)
def test_two_processes_equal_one(tmp_path):
    port = free_port()
    outs = [tmp_path / "p0.npz", tmp_path / "p1.npz", tmp_path / "single.npz"]
    commands = [
        [sys.executable, WORKER, "0", str(port), str(outs[0])],
        [sys.executable, WORKER, "1", str(port), str(outs[1])],
        [sys.executable, WORKER, "single", str(outs[2])],
    ]
    procs = [
        subprocess.Popen(
            c, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in commands
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{proc.args[2:4]} failed:\n{log[-4000:]}"

    single = dict(np.load(outs[2]))
    reference = {k[len("single/") :]: v for k, v in single.items()}
    assert any("stats" in k for k in reference) and any("updates" in k for k in reference)
    for out in outs[:2]:
        results = dict(np.load(out))
        for way in ("sharded", "shard_map"):
            for name, want in reference.items():
                got = results[f"{way}/{name}"]
                assert got.shape == want.shape, (way, name)
                np.testing.assert_allclose(
                    got, want, rtol=2e-4, atol=1e-6, err_msg=f"{out.name} {way}/{name}"
                )
    # Both processes hold the same replicated result, bit for bit.
    p0, p1 = dict(np.load(outs[0])), dict(np.load(outs[1]))
    assert p0.keys() == p1.keys()
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
