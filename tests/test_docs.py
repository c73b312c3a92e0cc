"""The documentation builds without warnings, covers every public name, and its code runs.

The docstring examples run as doctests in the suite (``pytest --doctest-modules
bogc_jax``); here every public function must have one, and the ``python`` code blocks of
the guides listed in ``RUNNABLE_PAGES`` are executed, section by section, in order.
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
    """``(modules, objects)`` that ``bogc_jax`` exports: its ``__all__``, or its imports."""
    names = getattr(bogc_jax, "__all__", None)
    if names is None:
        with open(os.path.join(ROOT, "bogc_jax", "__init__.py")) as f:
            tree = ast.parse(f.read())
        names = [
            a.asname or a.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bogc_jax")
            for a in node.names
        ]
    names = [n for n in names if not n.startswith("_")]  # __version__ is not API to document
    modules = [n for n in names if inspect.ismodule(getattr(bogc_jax, n))]
    objects = [n for n in names if not inspect.ismodule(getattr(bogc_jax, n))]
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


RUNNABLE_PAGES = ("flax.md",)


def page_sections(page):
    """``[(title, [(line, code), ...]), ...]``: a page's ``python`` blocks per ``##`` section.

    The blocks before the first ``##`` heading are the page's setup: they run before every
    section, so each section is a test of its own.
    """
    with open(os.path.join(DOCS, page)) as f:
        text = f.read()
    sections = [("setup", [])]
    pattern = re.compile(r"^## ([^\n]+)$|^```python\n(.*?)^```$", re.M | re.S)
    for match in pattern.finditer(text):
        if match.group(1):
            sections.append((match.group(1).strip(), []))
        else:
            line = text.count("\n", 0, match.start()) + 2
            sections[-1][1].append((line, match.group(2)))
    setup, rest = sections[0][1], sections[1:]
    return [(title, setup + blocks) for title, blocks in rest if blocks]


RUNNABLE_SECTIONS = [
    pytest.param(page, title, blocks, id=f"{page}::{title}")
    for page in RUNNABLE_PAGES
    for title, blocks in page_sections(page)
]


def test_runnable_pages_have_code():
    titles = {title for page, title, _ in (p.values for p in RUNNABLE_SECTIONS)}
    assert {"Flax NNX", "Flax Linen", "optax combinators"} <= titles


@pytest.mark.parametrize("page, title, blocks", RUNNABLE_SECTIONS)
def test_page_code_runs(page, title, blocks, monkeypatch):
    pytest.importorskip("flax")
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs_{page.replace('.', '_')}"}
    for line, code in blocks:
        # Pad with newlines so that a traceback names the page's own line numbers.
        exec(compile("\n" * (line - 1) + code, os.path.join("docs", page), "exec"), namespace)


# Pages that another part of the project adds; the README links them already.
PAGES_ADDED_ELSEWHERE = {"docs/representation.md"}


def test_readme_is_short_starts_with_the_two_commands_and_links_what_exists():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", readme, re.S | re.M)
    (main_lang, main_job), (test_lang, test_command) = blocks[:2]
    assert main_lang == test_lang == "bash"
    assert "python -m experiments.run" in main_job
    assert "python -m pytest" in test_command and "-n 2" in test_command
    assert not re.search(
        r"^#+ ", readme.split("```")[0].split("\n", 1)[1], re.M
    )  # no section before
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    local = [link for link in links if not re.match(r"https?://", link)]
    assert "docs/flax.md" in local and "docs/results.md" in local
    missing = [
        link
        for link in local
        if link not in PAGES_ADDED_ELSEWHERE and not os.path.exists(os.path.join(ROOT, link))
    ]
    assert not missing, f"README.md links to missing files: {missing}"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "n==2" in ci and 'bash -euo pipefail -c "$test_block"' in ci
