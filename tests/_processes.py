"""Shared test helpers: run a command in a fresh process, its output captured as text."""

import os
import subprocess


def cpu_env(**variables):
    """This process's environment with ``JAX_PLATFORMS=cpu`` and ``variables`` set."""
    return dict(os.environ, JAX_PLATFORMS="cpu", **variables)


def run_captured(argv, *, env=None, cwd=None, timeout=600):
    """``subprocess.run(argv)`` with stdout and stderr captured as text; a non-zero exit
    status is returned in ``returncode``, not raised."""
    return subprocess.run(
        [str(a) for a in argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
