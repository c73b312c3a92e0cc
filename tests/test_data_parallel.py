"""One device, 8 sharded devices, shard_map and pmap give the same training steps.

Each family (bogc, cggm, ogm_ge, mmpareto) runs in a subprocess that fakes 8 CPU devices
(``tests/workers/dp_worker.py``): two training steps of a small two-modality model, four
ways. Statistics (``source_grad_stats`` plain and chunked, ``laplace_grad_stats``, the
``bj.metrics`` scores), coefficients and diagnostics from the states, updates and new
parameters must agree with the single-device run to float tolerance, and pmap's eight
copies of every output must be identical.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "dp_worker.py")
WAYS = ("sharded", "shard_map", "pmap")


def worker_env(num_devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_worker(family: str, tmp_path) -> dict:
    out = tmp_path / f"{family}.npz"
    proc = subprocess.run(
        [sys.executable, WORKER, family, str(out)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("family", ["bogc", "cggm", "ogm_ge", "mmpareto"])
def test_four_ways_agree(family, tmp_path):
    results = run_worker(family, tmp_path)
    reference = {k[len("single/") :]: v for k, v in results.items() if k.startswith("single/")}
    expected = {
        "bogc": ("stats", "chunked_stats", "laplace_stats", "source_weights", "updates", "params"),
        "mmpareto": ("stats", "cosines", "updates", "params"),
        "cggm": ("scores", "coefficients", "grads", "updates", "params"),
        "ogm_ge": ("scores", "coefficients", "key", "grads", "updates", "params"),
    }
    for part in expected[family]:
        assert any(part in k for k in reference), f"the worker wrote no {part!r} outputs"
    assert any(k.startswith("1/") for k in reference), "the worker ran one step only"
    for way in WAYS:
        for name, want in reference.items():
            got = results[f"{way}/{name}"]
            assert got.shape == want.shape and got.dtype == want.dtype, (way, name)
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=f"{way}/{name}")
    spread = {k: float(v) for k, v in results.items() if k.startswith("pmap_spread/")}
    assert spread and max(spread.values()) == 0.0, {k: v for k, v in spread.items() if v}
    # The steps did something: statistics are not degenerate and the parameters moved.
    moved = [
        np.max(np.abs(reference[k] - reference["0/" + k[2:]]))
        for k in reference
        if k.startswith("1/params")
    ]
    assert max(moved) > 0


@pytest.mark.parametrize("method", ["bogc", "cggm"])
def test_example_script_three_ways_agree(method):
    """examples/data_parallel.py: jit-sharded, shard_map and pmap end where one device does."""
    script = os.path.join(ROOT, "examples", "data_parallel.py")
    env = worker_env()
    env["XLA_FLAGS"] = " ".join(  # the script fakes its 8 devices itself
        f for f in env["XLA_FLAGS"].split() if "device_count" not in f
    )
    proc = subprocess.run(
        [
            sys.executable,
            script,
            "--method",
            method,
            "--parallel",
            "all",
            "--steps",
            "4",
            "--batch-size",
            "16",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.startswith("8 devices")
    diffs = [
        float(line.rsplit(":", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("max |params(")
    ]
    assert len(diffs) == 3 and max(diffs) < 1e-5, proc.stdout
