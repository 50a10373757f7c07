"""Short training runs on a small demo scene: scored test renders, videos,
and exact resume without ray batching."""
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from nerf import scoring
import run_nerf
from nerf.demo_scene import ensure_demo_scene
from load_blender import load_blender_data
from test_cli import QUIET, TINY
from test_resume import assert_resume_is_exact


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "demo"
    ensure_demo_scene(str(path), verbose=False, H=24, W=24, n_train=10, n_val=2, n_test=3)
    return path


def demo_args(demo_dir: Path, basedir: Path, *extra: str):
    return ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(basedir),
            "--expname", "demo", "--white_bkgd", "--testskip", "1", *TINY, *QUIET, *extra]


def test_demo_run_scores_its_test_views_and_writes_videos(demo_dir, tmp_path):
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--N_iters", "4", "--i_weights", "4",
                                   "--i_testset", "4", "--i_video", "4")) == 0
    expdir = tmp_path / "demo"
    testdir = expdir / "testset_000004"
    result = scoring.load_metrics(testdir / "metrics.json")
    assert result["step"] == 4 and result["n_views"] == 3
    assert [v["name"] for v in result["views"]] == ["000.png", "001.png", "002.png"]

    # Recompute the mean PSNR from the PNGs on disk and the white-composited ground truth.
    imgs, _, _, _, (_, _, i_test) = load_blender_data(str(demo_dir), testskip=1)
    gt = imgs[i_test, ..., :3] * imgs[i_test, ..., 3:] + (1 - imgs[i_test, ..., 3:])
    gt8 = (255 * np.clip(gt, 0, 1)).astype(np.uint8) / 255.0
    psnrs = [-10 * np.log10(np.mean((imageio.imread(testdir / f"{k:03d}.png") / 255.0 - gt8[k]) ** 2))
             for k in range(3)]
    assert result["mean"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-9)

    for kind in ("rgb", "disp"):
        with imageio.get_reader(expdir / f"demo_spiral_000004_{kind}.mp4") as reader:
            assert reader.count_frames() == 40
            assert reader.get_data(0).shape[:2] == (24, 24)


def test_resume_without_batching_is_exact(demo_dir, tmp_path):
    assert_resume_is_exact(["--dataset_type", "demo", "--datadir", str(demo_dir), "--white_bkgd",
                            "--no_batching", "--N_rand", "64", "--precrop_iters", "3"], tmp_path, n=3)


def test_checkpoint_of_the_original_program_loads_and_resumes_at_the_next_step(demo_dir, tmp_path):
    """The original saves global_step = step - 1 with four keys only (its
    001000.tar holds 999); it must load unchanged and training must go on at
    step 1001 without repeating step 1000."""
    import torch

    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", "ours", "--N_iters", "2", "--i_weights", "2")) == 0
    ours = torch.load(tmp_path / "ours" / "000002.tar", weights_only=True)
    original = {k: ours[k] for k in ("network_fn_state_dict", "network_fine_state_dict", "optimizer_state_dict")}
    original["global_step"] = 999
    (tmp_path / "orig").mkdir()
    torch.save(original, tmp_path / "orig" / "001000.tar")
    before = (tmp_path / "orig" / "001000.tar").read_bytes()

    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", "orig", "--render_only",
                                   "--render_factor", "4")) == 0
    assert len(list((tmp_path / "orig" / "renderonly_path_000999").glob("*.png"))) == 40

    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", "orig", "--N_iters", "1001",
                                   "--i_weights", "1")) == 0
    assert sorted(p.name for p in (tmp_path / "orig").glob("*.tar")) == ["001000.tar", "001001.tar"]
    assert (tmp_path / "orig" / "001000.tar").read_bytes() == before
    resumed = torch.load(tmp_path / "orig" / "001001.tar", weights_only=True)
    assert resumed["global_step"] == 1001
    moved = max(float((resumed["network_fn_state_dict"][k] - v).abs().max())
                for k, v in original["network_fn_state_dict"].items())
    assert moved > 0
