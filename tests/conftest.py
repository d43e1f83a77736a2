"""Shared test settings: tests run on CPU with float32 matmuls at full precision."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "openpi_ref"


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    if not FIXTURES.exists():
        raise FileNotFoundError(f"openpi reference fixtures not found at {FIXTURES} (expected ../shared next to the repo)")
    return FIXTURES
