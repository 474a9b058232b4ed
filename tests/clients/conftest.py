"""Fixtures for the integration tests with the real clients, each in its own pinned venv (tools/env/client_env.sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools.common.bundles import REPO_ROOT


def client_python(name: str) -> Path:
    """The python of client ``name``'s venv, created from tests/clients/requirements-<name>.txt if missing or stale."""
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "env" / "client_env.sh"), name], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"tools/env/client_env.sh {name} failed:\n{done.stdout}\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def monailabel_python() -> Path:
    """Python of the MONAI Label venv."""
    return client_python("monailabel")


@pytest.fixture(scope="session")
def deploy_python() -> Path:
    """Python of the MONAI Deploy App SDK venv."""
    return client_python("deploy")
