"""The GPU benchmark suite runs unchanged on a CPU with --quick, end to end, and writes its
JSON (device, library commit, statistics, steps, compile times, memory) and its plot."""

import json
import os
import sys

import pytest

from tests._processes import cpu_env, run_captured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The gpu suite's steps: joint_uni and ogm_ge are left out to keep it under 8 minutes.
GPU_STEPS = ("joint", "bogc", "bogc_repr", "cggm", "mmpareto")


def test_gpu_suite_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    bench_py = os.path.join(ROOT, "benchmarks", "bench.py")
    proc = run_captured(
        [sys.executable, bench_py, "--suite", "gpu", "--quick", "--out", out], env=cpu_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training step / joint step" in proc.stdout and "Compile time" in proc.stdout
    result = json.loads(out.read_text())
    assert result["suite"] == "gpu" and result["device"]["platform"] == "cpu"
    assert result["library_commit"] != "unknown"
    (row,) = result["rows"]
    assert f"| {row['model']} |" in proc.stdout
    jax_rows = row["jax"]
    assert {k for k in jax_rows if k.startswith("step_")} == {f"step_{s}" for s in GPU_STEPS}
    for name in ("grad", "fast", "vmap") + tuple(f"step_{s}" for s in GPU_STEPS):
        entry = jax_rows[name]
        assert entry["time_s"] > 0 and entry["compile_s"] > 0 and entry["ops"] > 0, name
        assert entry["peak_mib"] is None or entry["peak_mib"] >= 0, name
    assert jax_rows["grad"]["ratio"] == 1.0 and jax_rows["step_joint"]["ratio"] == 1.0
    assert jax_rows["step_joint"]["compile_ratio"] == 1.0
    # The statistics do more work than one batch gradient: more operations to compile.
    assert jax_rows["step_bogc"]["ops"] > jax_rows["step_joint"]["ops"]

    pytest.importorskip("matplotlib")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench  # pylint: disable=g-import-not-at-top

    second = dict(row, batch=2 * row["batch"])
    png = tmp_path / "scaling.png"
    assert bench.plot(dict(result, rows=[row, second]), str(png))
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("isolate", ["--isolate", "--no-isolate"])
def test_rows_measured_in_fresh_processes_or_in_one(tmp_path, isolate):
    out = tmp_path / "bench.json"
    bench_py = os.path.join(ROOT, "benchmarks", "bench.py")
    args = ["--suite", "scaling", "--quick", "--no-torch", "--stats", "grad,fast"]
    args += ["--steps", "joint", "--batch-sizes", "8", "--train-batch-sizes", "8"]
    args += ["--params-models", "mlp256", "--models", "mlp512", "--out", out, isolate]
    proc = run_captured([sys.executable, bench_py, *args], env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"], r["sweep"]) for r in rows] == [
        ("mlp512", 8, "batch"),
        ("mlp256", 8, "params"),
    ]
    for row in rows:
        assert row["jax"]["fast"]["time_s"] > 0 and row["jax"]["step_joint"]["ratio"] == 1.0
    pids = {row["pid"] for row in rows}
    assert len(pids) == (2 if isolate == "--isolate" else 1)


def test_the_allocator_settings_are_recorded_and_their_absence_noted(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench  # pylint: disable=g-import-not-at-top

    for key in list(os.environ):
        if key.startswith("MALLOC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1073741824")
    assert bench.allocator()["settings"] == {"MALLOC_TOP_PAD_": "1073741824"}
    assert bench.allocator_note("gpu") is None  # the accelerator's allocator is XLA's own
    glibc = bench.platform.libc_ver()[0] == "glibc"
    note = bench.allocator_note("cpu")
    assert (note is not None) == glibc
    if glibc:
        assert "MALLOC_ARENA_MAX=1" in note and "page faults" in note
    for key, value in bench.STEADY_ALLOCATOR.items():
        monkeypatch.setenv(key, value)
    assert bench.allocator_note("cpu") is None
    assert set(bench.STEADY_ALLOCATOR) <= set(bench.allocator()["settings"])
