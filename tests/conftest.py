"""Shared fixtures: where the real example scenes live. Tests never download:
LPIPS's VGG16 fetch is off for this process and every run it starts."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["NERF_NO_DOWNLOAD"] = "1"


def shared_dir() -> Path:
    """`../shared` beside the checkout (holds data/ and reference/)."""
    return REPO.parent / "shared"


def data_root() -> Path:
    return Path(os.environ.get("NERF_DATA", shared_dir() / "data"))


@pytest.fixture(scope="session")
def fern_dir() -> Path:
    path = data_root() / "nerf_llff_data" / "fern"
    if not (path / "poses_bounds.npy").exists():
        pytest.skip(f"real fern scene not found at {path} (set NERF_DATA)")
    return path


@pytest.fixture(scope="session")
def lego_dir() -> Path:
    path = data_root() / "nerf_synthetic" / "lego"
    if not (path / "transforms_train.json").exists():
        pytest.skip(f"real lego scene not found at {path} (set NERF_DATA)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = shared_dir() / "reference"
    if not path.is_dir():
        pytest.skip(f"reference outputs of the original not found at {path}")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about 10 s (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run by scripts/gpu_check.sh")


def scene_copy_without(scene: Path, dest: Path, missing: str) -> Path:
    """`scene` laid out again under `dest` as symlinks, except the file
    `missing` (relative to the scene): for tests of what happens when a file
    is absent, whether or not the scene they read has it."""
    for folder, _, files in os.walk(scene, followlinks=True):
        for name in files:
            rel = (Path(folder) / name).relative_to(scene)
            if rel != Path(missing):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(scene / rel, dest / rel)
    return dest
