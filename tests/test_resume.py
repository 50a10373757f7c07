"""Exact resume: N steps, stop, N more gives the weights of 2N steps in one run."""
from pathlib import Path

import torch

import run_nerf
from test_cli import QUIET, TINY


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
