"""The built wheel installs into a fresh virtual environment and the README's diff runs there.

The wheel is built without build isolation from a copy of the files it is made of, and
installed with ``--no-deps --no-index`` into a new virtual environment that borrows this
environment's third-party packages (jax, optax, numpy) through a ``.pth`` line, so that
nothing is downloaded. The example then runs from a folder outside the repository, where
only the installed wheel can provide ``bogc_jax``.
"""

import email
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from tests._processes import run_captured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None,
    reason="building the wheel needs setuptools (the dev extra)",
)


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def diff_sides():
    """The README's diff example as two programs: (before, after)."""
    (diff,) = re.findall(r"^```diff\n(.*?)^```$", readme(), re.S | re.M)
    lines = diff.splitlines()
    side = lambda keep: "\n".join(s[1:] for s in lines if s[:1] in (" ", keep) or not s)
    return side("-"), side("+")


# What the README leaves to the reader: a two-view model, its per-example loss, a batch.
SETUP = """
import jax, jax.numpy as jnp, optax

def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

def dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) / n_in**0.5, "b": jnp.zeros(n_out)}

keys = jax.random.split(jax.random.key(0), 8)
params = {
    "encoders": [dense(keys[0], 6, 8), dense(keys[1], 4, 8)],
    "fusion": dense(keys[2], 16, 3),
    "heads": [dense(keys[3], 8, 3), dense(keys[4], 8, 3)],
}

def model_apply(params, xs):
    feats = [jnp.tanh(x @ e["w"] + e["b"]) for e, x in zip(params["encoders"], xs)]
    fusion = params["fusion"]
    fused = jnp.concatenate(feats, axis=-1) @ fusion["w"] + fusion["b"]
    return fused, [h @ head["w"] + head["b"] for head, h in zip(params["heads"], feats)]

y = jax.random.randint(keys[5], (24,), 0, 3)
batch = ([jax.random.normal(keys[6], (24, 6)) + jax.nn.one_hot(y, 6),
          jax.random.normal(keys[7], (24, 4)) + jax.nn.one_hot(y, 4)], y)
"""

# After the README's code: a short run that must lower every source's loss.
TRAIN = """
first = losses_fn(params, batch).mean(axis=1)
opt_state = tx.init(params)
for _ in range(30):
    params, opt_state = step(params, opt_state, batch)
last = losses_fn(params, batch).mean(axis=1)
assert bool(jnp.isfinite(last).all()) and bool((last < first).all()), (first, last)
print("losses", first.tolist(), "->", last.tolist())
"""

CHECK_INSTALL = """
import importlib.metadata, os, sys
import bogc_jax
venv = sys.argv[1]
assert os.path.realpath(bogc_jax.__file__).startswith(os.path.realpath(venv)), bogc_jax.__file__
dist = importlib.metadata.distribution("bogc-jax")
assert dist.version == bogc_jax.__version__, (dist.version, bogc_jax.__version__)
files = {str(f) for f in dist.files}
assert "bogc_jax/py.typed" in files, files
assert any(f.endswith("licenses/LICENSE") for f in files), files
try:
    import experiments
except ImportError:
    pass
else:
    raise AssertionError("experiments/ is importable: not running outside the repository")
print("installed", dist.version, "at", os.path.dirname(bogc_jax.__file__))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of pyproject.toml, README.md, LICENSE and bogc_jax/."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(
        os.path.join(ROOT, "bogc_jax"),
        src / "bogc_jax",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (path,) = dist.glob("bogc_jax-*.whl")
    return path


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(metadata_name))
        assert "bogc_jax/py.typed" in names
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert b"Apache License" in zf.read(license_name)
    assert not [n for n in names if n.split("/")[0] in ("experiments", "tests", "benchmarks")]

    namespace = {}
    with open(os.path.join(ROOT, "bogc_jax", "_version.py")) as f:
        exec(f.read(), namespace)
    assert metadata["Version"] == namespace["__version__"]
    assert metadata["License-Expression"] == "Apache-2.0"
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Repository", "Documentation", "Changelog", "Issues"} <= set(urls)
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    # The long description is the README, short enough to read on an index page.
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == readme().strip()
    assert len(readme().splitlines()) <= 250
    # The core needs jax, optax and numpy; flax, chex and orbax are extras.
    core = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(re.match(r"[A-Za-z0-9_.-]+", r).group() for r in core) == [
        "jax",
        "numpy",
        "optax",
    ]


def test_wheel_installs_into_a_fresh_venv_and_the_readme_diff_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
        + ["--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )

    # Then borrow this environment's packages (jax, optax, numpy, ...) without their .pth
    # files, so that an editable bogc_jax of this environment stays invisible (installed
    # first, so that pip does not take this environment's bogc-jax for the installed one).
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    borrowed |= set(site.getsitepackages())
    with open(os.path.join(purelib, "borrowed.pth"), "w") as f:
        f.write("\n".join(sorted(p for p in borrowed if os.path.isdir(p))) + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    before, after = diff_sides()
    scripts = {
        "check_install.py": CHECK_INSTALL,
        "before.py": SETUP + before + TRAIN,
        "after.py": SETUP + after + TRAIN,
    }
    for name, code in scripts.items():
        (outside / name).write_text(textwrap.dedent(code))
        proc = run_captured([python, name, venv], cwd=outside, env=env, timeout=240)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    assert "import bogc_jax as bj" in after and "bj.bogc(" in after and "bj." not in before
