"""Shared test settings: tests run on CPU with float32 matmuls at full precision."""
import os
import pathlib
import runpy
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
LEROBOT_FIXTURES = SHARED / "fixtures" / "lerobot_ref"
LEROBOT_POLICY = LEROBOT_FIXTURES / "diffusion_tiny"  # a LeRobot Diffusion Policy folder (random weights, LIBERO-shaped)


def script(name: str) -> types.SimpleNamespace:
    """A top-level script of the repo run as a module (its ``main`` and ``Args`` reachable as attributes)."""
    return types.SimpleNamespace(**runpy.run_path(str(REPO_ROOT / name)))


def require_lerobot_policy() -> pathlib.Path:
    """The LeRobot fixture folder, or a clear error (never a skip: the parity tests must run)."""
    if not LEROBOT_POLICY.is_dir():
        raise FileNotFoundError(f"LeRobot reference fixtures not found at {LEROBOT_FIXTURES}")
    return LEROBOT_POLICY
FIXTURES = SHARED / "fixtures" / "openpi_ref"


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    if not FIXTURES.exists():
        raise FileNotFoundError(f"openpi reference fixtures not found at {FIXTURES} (expected ../shared next to the repo)")
    return FIXTURES


@pytest.fixture(scope="session")
def env():
    """One real LIBERO env (libero_spatial task 0, 256x256 cameras with instance segmentation), shared by the
    LIBERO test modules: creating one costs 5-10 s of the CPU budget, and every test resets it before use."""
    from openpi.envs import libero_env

    e = libero_env.LiberoTaskEnv("libero_spatial", 0, segmentation=True, seed=7)
    yield e
    e.close()
