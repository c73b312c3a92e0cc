"""The sharding recipe users write for optax works for every transform (8 fake devices).

param PartitionSpecs -> ``optax.tree.map_params`` -> ``NamedSharding`` -> ``device_put``
-> a jitted step with donated params and state, each transform chained with adam. It runs
in a subprocess (tests/workers/sharding_recipe_worker.py): the fake devices must be
requested before jax is imported.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "workers", "sharding_recipe_worker.py")


def test_map_params_shardings_device_put_and_donated_jit_for_every_transform():
    env = dict(os.environ)  # the worker asks for its own fake devices; other flags pass through
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["bogc", "cggm", "ogm_ge", "mmpareto"]
    for row in rows:
        assert row["close"] and row["kept"] and row["finite"], row
        # adam's moments took the parameters' shardings through map_params.
        assert row["mu_specs"] == ["P('d', None)", "P('d',)", "P(None, 'd')"], row
