"""Exact resume: N steps, stop, N more gives the weights of 2N steps in one run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import run_nerf
from conftest import REPO
from nerf import lpips_vgg
from nerf.demo_scene import ensure_demo_scene
from test_cli import QUIET, TINY
from test_metrics import stub_lpips  # noqa: F401 (fixture)


def final_state(expdir: Path, step: int) -> dict:
    ckpt = torch.load(expdir / f"{step:06d}.tar", weights_only=True)
    assert ckpt["global_step"] == step
    return {**{f"fn.{k}": v for k, v in ckpt["network_fn_state_dict"].items()},
            **{f"fine.{k}": v for k, v in ckpt["network_fine_state_dict"].items()}}


def assert_resume_is_exact(scene_args, tmp_path: Path, n: int):
    common = ["--basedir", str(tmp_path), *TINY, *QUIET, "--lrate", "5e-3", "--lrate_decay", "1", *scene_args]
    assert run_nerf.main([*common, "--expname", "straight", "--N_iters", str(2 * n), "--i_weights", str(2 * n)]) == 0
    assert run_nerf.main([*common, "--expname", "resumed", "--N_iters", str(n), "--i_weights", str(n)]) == 0
    assert run_nerf.main([*common, "--expname", "resumed", "--N_iters", str(2 * n), "--i_weights", str(n)]) == 0

    straight, resumed = final_state(tmp_path / "straight", 2 * n), final_state(tmp_path / "resumed", 2 * n)
    halfway = final_state(tmp_path / "resumed", n)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # The second half really trained: the weights moved after the resume.
    assert max(float((resumed[k] - halfway[k]).abs().max()) for k in resumed) > 1e-4


def test_resume_with_ray_batching_is_exact(fern_dir, tmp_path):
    assert_resume_is_exact(["--datadir", str(fern_dir), "--dataset_type", "llff"], tmp_path, n=4)


class DrawingLPIPS(torch.nn.Module):
    """A stand-in LPIPS network that draws from the global generators as the
    real one does when its layers initialise (and, to be sure, when it runs)."""

    def __init__(self, net="alex", verbose=True, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)   # kaiming init: torch's global generator
        np.random.rand(5)

    def forward(self, a, b):
        noise = torch.rand(1) + float(np.random.rand())
        return ((a - b) ** 2).mean().reshape(1, 1, 1, 1) + 0 * noise


@pytest.mark.slow
def test_resume_from_a_test_set_step_is_exact_with_lpips(stub_lpips, monkeypatch, tmp_path):
    """LPIPS is built at the first test-set render, right after that step's
    checkpoint is saved: resumed from that checkpoint, the run must continue
    as the uninterrupted one, which built (and ran) LPIPS in between."""
    lpips, hub = stub_lpips
    monkeypatch.setattr(lpips, "LPIPS", DrawingLPIPS)
    scorers = []

    def scorer(download=None):   # one per process, as default_lpips_scorer
        if not scorers:
            scorers.append(lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu", download=False))
        return scorers[0]

    monkeypatch.setattr(lpips_vgg, "default_lpips_scorer", scorer)
    demo = tmp_path / "demo"
    ensure_demo_scene(str(demo), verbose=False, H=24, W=24, n_train=6, n_val=1, n_test=2)
    common = ["--config", str(REPO / "configs" / "demo.txt"), "--datadir", str(demo), "--basedir", str(tmp_path),
              *TINY, *QUIET, "--i_weights", "5", "--i_testset", "5", "--i_video", "1000000"]
    assert run_nerf.main([*common, "--expname", "straight", "--N_iters", "10"]) == 0
    assert scorers[0].available and scorers[0].reason is None
    scorers.clear()   # the next run is a new process
    assert run_nerf.main([*common, "--expname", "resumed", "--N_iters", "5"]) == 0
    assert run_nerf.main([*common, "--expname", "resumed", "--N_iters", "10"]) == 0
    straight, resumed = final_state(tmp_path / "straight", 10), final_state(tmp_path / "resumed", 10)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    lpips_of_step_10 = [json.loads((tmp_path / name / "testset_000010" / "metrics.json").read_text())["mean"]["lpips"]
                        for name in ("straight", "resumed")]
    assert lpips_of_step_10[0] is not None and lpips_of_step_10[0] == lpips_of_step_10[1]
