"""Statistics and the bogc update: one device vs a batch split over 8 fake CPU devices.

The worker (tests/multidevice_stats_worker.py) runs in its own process, because the
number of fake devices is fixed when jax starts: XLA_FLAGS carries
--xla_force_host_platform_device_count=8 in the child's environment before jax is
imported. It prints one JSON verdict; each check below reads its part of it.
"""

import json
import os
import pathlib
import sys

import pytest

from tests._processes import cpu_env, run_captured

WORKER = pathlib.Path(__file__).with_name("multidevice_stats_worker.py")
ROOT = WORKER.parent.parent

CHECKS = [
    "shard_map",
    "shard_map_chunked",
    "shard_map_no_check_vma",
    "shard_map_auto",
    "jit_sharded",
    "jit_sharded_chunked",
    "jit_sharded_auto",
    "jit_unplaced_params",
    "jit_unplaced_params_chunked",
    "pmap_chunked",
    "laplace_shard_map",
    "laplace_shard_map_no_check_vma",
    "laplace_jit_sharded",
    "laplace_jit_unplaced_params",
    "laplace_shard_map_auto",
]


@pytest.fixture(scope="module")
def verdict():
    flag = "--xla_force_host_platform_device_count=8"
    env = cpu_env(
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip(),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    proc = run_captured([sys.executable, WORKER], env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"worker printed no verdict (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    result["returncode"] = proc.returncode
    result["stderr"] = proc.stderr[-3000:]
    return result


def test_worker_sees_eight_devices_and_passes(verdict):
    assert verdict["device_count"] == 8
    assert set(verdict["errors"]) | set(verdict["exceptions"]) >= set(CHECKS)
    assert verdict["returncode"] == 0, verdict["stderr"]


@pytest.mark.parametrize("check", CHECKS)
def test_split_batch_equals_single_device(verdict, check):
    """Statistics, and every aggregation's bogc update from them (property 8)."""
    assert check not in verdict["exceptions"], verdict["exceptions"][check]
    tolerance = verdict["tolerance"]
    errors = {k: v for k, v in verdict["errors"].items() if k == check or k.startswith(check + "/")}
    assert set(errors) == {
        check,
        f"{check}/bogc_in_program",
        f"{check}/bogc_dempster",
        f"{check}/bogc_precision",
        f"{check}/bogc_dimension_frame",
    }
    assert all(v <= tolerance for v in errors.values()), errors


@pytest.mark.parametrize("name", ["stats", "laplace"])
def test_forgetting_axis_name_on_split_batch_is_an_error(verdict, name):
    """Inside shard_map on 8 devices without axis_name: an error naming the fix, not the
    device-summed gradients' statistics."""
    assert verdict["guards"][f"{name}_forgotten_axis_name"] == "ok"
