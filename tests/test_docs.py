"""The API documentation builds without warnings and covers every public name.

The examples themselves run as doctests in the suite (``pytest --doctest-modules
bogc_jax``); here every public function must have one.
"""

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

import bogc_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def public_names():
    """``(modules, objects)`` that ``bogc_jax/__init__.py`` exports."""
    with open(os.path.join(ROOT, "bogc_jax", "__init__.py")) as f:
        tree = ast.parse(f.read())
    modules, objects = [], []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "bogc_jax":
            modules += [a.asname or a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module.startswith("bogc_jax."):
            objects += [a.asname or a.name for a in node.names]
    return modules, objects


def public_functions():
    """Every public function: exported ones and those defined in exported modules."""
    modules, objects = public_names()
    found = {
        f"bogc_jax.{n}": getattr(bogc_jax, n)
        for n in objects
        if inspect.isfunction(getattr(bogc_jax, n))
    }
    for m in modules:
        module = getattr(bogc_jax, m)
        for name, obj in vars(module).items():
            if (
                not name.startswith("_")
                and inspect.isfunction(obj)
                and obj.__module__ == module.__name__
            ):
                found[f"bogc_jax.{m}.{name}"] = obj
    return found


def test_api_reference_covers_every_public_name():
    with open(os.path.join(DOCS, "api.rst")) as f:
        api = f.read()
    modules, objects = public_names()
    assert objects and modules
    documented = set(re.findall(r"^\.\. auto(?:function|class|data):: (\w+)", api, re.M))
    missing = sorted(set(objects) - documented)
    assert not missing, f"docs/api.rst does not document {missing}"
    for m in modules:
        assert f".. automodule:: bogc_jax.{m}" in api, f"docs/api.rst lacks module {m}"


def test_every_public_function_has_an_example():
    functions = public_functions()
    assert "bogc_jax.bogc" in functions and "bogc_jax.metrics.accuracy" in functions
    missing = [
        name
        for name, fn in sorted(functions.items())
        if not re.search(r"^\s*Examples?:\s*$", fn.__doc__ or "", re.M)
        or ">>>" not in (fn.__doc__ or "")
    ]
    assert not missing, f"public functions without a runnable Example: section: {missing}"


@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None,
    reason="sphinx is not installed (pip install -e '.[docs]')",
)
def test_docs_build_without_warnings(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            DOCS,
            str(tmp_path / "html"),
            "-d",
            str(tmp_path / "doctrees"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("bogc_jax.bogc", "bogc_jax.multi_steps", "bogc_jax.metrics.accuracy"):
        assert f'id="{name}"' in api, name
