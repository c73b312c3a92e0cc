"""The Colab notebook runs top to bottom on a CPU, as committed, needing only the wheel.

The notebook is executed with nbclient from a folder outside the repository, so it can
read nothing but what ``bogc_jax`` ships (no ``experiments/``, no data files). Its install
cell is a no-op here (``bogc_jax`` is importable); what it would install on a bare runtime
is checked separately, by running that cell with ``%pip`` recorded instead of executed.
"""

import importlib.util
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "bogc_and_cggm.ipynb")
REAL_FIND_SPEC = importlib.util.find_spec
PIP_MAGIC = re.compile(r"^(\s*)%pip (.*)$", re.M)


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def install_cell(nb):
    cells = [c for c in nb.cells if c.cell_type == "code" and "%pip" in c.source]
    assert len(cells) == 1, "the notebook has one install cell"
    return cells[0].source


def repository_url():
    """``[project.urls] Repository`` of pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^Repository = "(.+)"$', f.read(), re.M).group(1)


def run_install_cell(source, cwd, bogc_jax_importable, monkeypatch):
    """Run the install cell as plain Python: return the ``%pip`` arguments it would run."""
    recorded = []
    python = PIP_MAGIC.sub(lambda m: f"{m[1]}_pip(f{m[2]!r})", source)

    def find_spec(name, *args, **kwargs):
        if name == "bogc_jax":
            return REAL_FIND_SPEC(name) if bogc_jax_importable else None
        return REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.chdir(cwd)
    exec(compile(python, "install cell", "exec"), {"_pip": recorded.append})
    return recorded


def test_install_cell_installs_the_checkout_or_the_repository(tmp_path, monkeypatch):
    source = install_cell(read_notebook())
    assert re.search(rf'^REPOSITORY = "{re.escape(repository_url())}"$', source, re.M), (
        "the notebook's REPOSITORY must be pyproject.toml's [project.urls] Repository"
    )
    # A bare runtime outside any checkout (Colab): pip installs from the repository.
    (args,) = run_install_cell(source, tmp_path, False, monkeypatch)
    assert args == f'install -q "bogc-jax[flax] @ git+{repository_url()}"'
    # Opened from the examples/ folder of a checkout: pip installs that checkout.
    (args,) = run_install_cell(source, os.path.join(ROOT, "examples"), False, monkeypatch)
    assert args == f'install -q "{ROOT}[flax]"'
    # Where bogc_jax is importable, the cell installs nothing.
    assert run_install_cell(source, tmp_path, True, monkeypatch) == []


def test_notebook_needs_only_the_wheel_and_links_to_colab():
    nb = read_notebook()
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"^\s*(from|import) experiments\b", code, re.M)
    assert "sys.path" not in code and "open(" not in code  # no files outside the wheel
    url = repository_url().removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{url}/blob/main/examples/bogc_and_cggm.ipynb"
    assert badge in nb.cells[0].source
    with open(os.path.join(ROOT, "README.md")) as f:
        assert badge in f.read()


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("nbclient", "ipykernel", "matplotlib")),
    reason="executing the notebook needs nbclient, ipykernel and matplotlib (the dev extra)",
)
def test_notebook_executes(tmp_path, monkeypatch):
    import nbclient

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel sees bogc_jax and nothing else of the repository (no experiments/).
    packages = tmp_path / "packages"
    packages.mkdir()
    (packages / "bogc_jax").symlink_to(os.path.join(ROOT, "bogc_jax"))
    monkeypatch.setenv("PYTHONPATH", str(packages))
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = read_notebook()
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},  # outside the repository
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Successfully installed" not in text  # the install cell is a no-op here
    figures = [
        o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(figures) >= 3
    # Every method learned the task: the fused prediction is far above chance (0.1) and
    # above what the coarse modality alone can give (about 0.5).
    for method in ("sum", "bogc", "cggm"):
        line = next(row for row in text.splitlines() if row.startswith(method))
        fused = float(line.split("fused")[1].split()[0])
        assert fused > 0.8, line
