"""The benchmark script runs end to end on tiny shapes and writes its JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench.py"),
            "--quick",
            "--no-torch",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mlp | 8 |" in proc.stdout and "Training step / joint step" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    jax_rows = row["jax"]
    for name in ("grad", "fast", "vmap", "vmap_chunked", "step_joint", "step_bogc"):
        assert jax_rows[name]["time_s"] > 0, name
        assert jax_rows[name]["peak_mib"] is None or jax_rows[name]["peak_mib"] >= 0
    assert jax_rows["grad"]["ratio"] == 1.0 and jax_rows["step_joint"]["ratio"] == 1.0
