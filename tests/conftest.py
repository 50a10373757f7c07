"""Shared fixtures: where the real example scenes live. Tests never download:
LPIPS's VGG16 fetch is off for this process and every run it starts."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["NERF_NO_DOWNLOAD"] = "1"

# How far apart the weights of two short training runs may be (max abs difference over all weights) when
# they compute the same steps with the float operations in another order: 2 processes against 1 (each
# step's gradient summed over two shares, then all-reduced), the fused fast path against the plain one, a GPU
# against another. Adam amplifies the rounding: its step lr * m / sqrt(v) does not scale with the gradient,
# so a weight whose gradient is at rounding level can move by up to 2 lr (1e-3) in one step.
# Measured with the tests' tiny networks (the demo scene 26 steps across an epoch end, seeds 0-7; fern 20
# steps with and without batching, seeds 0, 1, 2, 4): 1 vs 2 processes 1.5e-8 to 1.1e-6; 1 process with
# another --netchunk (other blocks, same math) up to 2.9e-6; fast vs plain path after 3 steps 1.5e-8;
# 1 vs 8 threads 0 here; another machine saw just over 1e-5 for 1 vs 2 processes (issue 19). Other rays
# (half the batch) moved the weights by 1.0e-3 after one step and 5.8e-3 to 1.2e-2 after 20 to 26 steps, in
# every case measured.
# 1e-4: 10x the largest rounding seen anywhere, 10x below a single step taken on other rays.
ROUNDING_ATOL = 1e-4


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
