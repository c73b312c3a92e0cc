"""Metrics, cggm, ogm_ge and mmpareto: the same on 1 device and on 8 fake devices.

The work runs in a subprocess (tests/workers/modality_worker.py) because the 8 fake CPU
devices must be requested before jax is imported.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "modality_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("modality") / "out.npz"
    env = dict(os.environ)  # the worker asks for its own fake devices; other flags pass through
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, WORKER, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def _pairs(results, prefix):
    keys = [k for k in results if k.startswith("single/" + prefix)]
    assert keys, f"no results for {prefix}"
    for key in keys:
        yield key, results[key], results["shard_map/" + key[len("single/") :]]


def test_metrics_on_8_devices_equal_the_whole_batch(results):
    names = set()
    for key, one, many in _pairs(results, "metrics"):
        names.add(key)
        np.testing.assert_allclose(many, one, rtol=1e-6, err_msg=key)
        assert 0.0 < float(one) <= 1.0, key
    assert len(names) == 4


@pytest.mark.parametrize("family", ["cggm_stable", "cggm_reference", "ogm_ge", "mmpareto"])
def test_transform_on_8_devices_equals_one_device(results, family):
    checked = 0
    for key, one, many in _pairs(results, family + "/"):
        scale = max(1.0, float(np.max(np.abs(one)))) if one.size else 1.0
        np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6 * scale, err_msg=key)
        checked += 1
    assert checked > 20
    coeffs = [
        k
        for k in results
        if k.startswith(f"single/{family}/1/") and ("coefficients" in k or "cosines" in k)
    ]
    assert coeffs  # the diagnostics were compared too
