"""The GPU tier: what only a CUDA device can show. Every test here skips
without one; `scripts/gpu_check.sh` runs them (`pytest -m gpu`) on whatever
CUDA device is present. They use the built-in demo scene, so they need no
downloaded data."""
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from nerf import fast_mlp, rendering
import run_nerf
from conftest import ROUNDING_ATOL
from nerf.ray_batches import ImageRaySampler, RayBatcher
from run_nerf_helpers import NeRF, get_embedder
from test_demo_run import demo_args, demo_dir  # noqa: F401 (fixture)
from test_devices import RunsOutOfMemory, small_render_kwargs
from test_fast_path import small_images
from test_resume import assert_resume_is_exact, final_state

REPO = Path(__file__).resolve().parents[1]
CUDA = ["--device", "cuda"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")]


def test_fast_path_matches_the_plain_path_on_cuda():
    torch.manual_seed(0)
    embed_fn, input_ch = get_embedder(10)
    embeddirs_fn, input_ch_views = get_embedder(4)
    net = NeRF(D=8, W=256, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5, use_viewdirs=True).cuda()
    embed_fn, embeddirs_fn = embed_fn.cuda(), embeddirs_fn.cuda()
    pts = torch.randn(64, 48, 3, device="cuda")
    dirs = torch.nn.functional.normalize(torch.randn(64, 3, device="cuda"), dim=-1)
    assert fast_mlp.supports(net, embed_fn, embeddirs_fn, pts, dirs)
    outs, grads = [], []
    for fast in (True, False):
        out = rendering.run_network(pts, dirs, net, embed_fn, embeddirs_fn, 1000, fast=fast)
        (g,) = torch.autograd.grad(out.square().sum(), net.pts_linears[0].weight)
        outs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)


def test_resume_on_cuda_is_exact(demo_dir, tmp_path):  # noqa: F811
    assert_resume_is_exact(["--dataset_type", "demo", "--datadir", str(demo_dir), "--white_bkgd",
                            "--no_batching", "--N_rand", "64", *CUDA], tmp_path, n=3)
    assert_resume_is_exact(["--dataset_type", "demo", "--datadir", str(demo_dir), "--white_bkgd", *CUDA],
                           tmp_path / "batching", n=3)


def test_render_only_on_cuda_gives_the_cpu_frames(demo_dir, tmp_path):  # noqa: F811
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--N_iters", "3", "--i_weights", "3", *CUDA)) == 0
    frames = {}
    for device in ("cuda", "cpu"):
        assert run_nerf.main(demo_args(demo_dir, tmp_path, "--render_only", "--render_test", "--device", device)) == 0
        folder = tmp_path / "demo" / "renderonly_test_000003"
        frames[device] = [iio.imread(p).astype(int) for p in sorted(folder.glob("[0-9]*.png"))]
        os.rename(folder, tmp_path / "demo" / f"rendered_on_{device}")
    assert len(frames["cuda"]) == len(frames["cpu"]) == 3
    for a, b in zip(frames["cuda"], frames["cpu"]):
        assert np.abs(a - b).max() <= 1                   # float32 on two devices: at most one 8-bit level


@pytest.mark.parametrize("no_batching", [False, True])
def test_pinned_host_memory_path_on_cuda_draws_the_same_batches(no_batching):
    images, poses, K = small_images()
    H, W = images.shape[1:3]
    device = torch.device("cuda")
    runs = []
    for budget in (None, 0):                               # all on the GPU, then nothing on it
        np.random.seed(0)
        torch.manual_seed(0)
        if no_batching:
            sampler = ImageRaySampler(images, poses, [0, 1, 3], H, W, K, 17, 5, 0.5, device,
                                      device_budget_bytes=budget)
        else:
            sampler = RayBatcher(images, poses, [0, 1, 3], H, W, K, 100, device, device_budget_bytes=budget)
        assert (sampler.fetch is None) == (budget is None)
        runs.append([tuple(t.cpu() for t in sampler(i)) for i in range(1, 15)])
    for (r0, t0), (r1, t1) in zip(*runs):
        assert torch.equal(r0, r1) and torch.equal(t0, t1)


def test_out_of_memory_on_cuda_is_caught_and_renders_fall_back():
    with pytest.raises(torch.OutOfMemoryError):            # what the fallbacks catch is what CUDA raises
        torch.empty(2 ** 50, dtype=torch.uint8, device="cuda")
    embed_fn, _ = get_embedder(2)
    embed_fn = embed_fn.cuda()
    H, W, focal = 12, 16, 14.0
    K = np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    poses = torch.eye(4, device="cuda")[None].repeat(2, 1, 1)
    poses[:, 2, 3] = torch.tensor([4.0, 5.0], device="cuda")

    def kwargs(query):
        out = small_render_kwargs(query)
        out["network_fn"] = out["network_fn"].cuda()
        return out
    reference = rendering.render_path(poses, [H, W, focal], K, 7,
                                      kwargs(rendering.make_network_query_fn(embed_fn, None, 50)))
    tight = RunsOutOfMemory(rendering.make_network_query_fn(embed_fn, None, 4096), limit=480)
    rgbs, disps = rendering.render_path(poses, [H, W, focal], K, 4096, kwargs(tight))
    np.testing.assert_allclose(rgbs, reference[0], rtol=0, atol=1e-6)   # cuBLAS may pick other kernels
    np.testing.assert_allclose(disps, reference[1], rtol=1e-6, atol=1e-6)


def test_two_processes_on_cuda_train_like_one(demo_dir, tmp_path):  # noqa: F811
    """NCCL across two GPUs where there are two, else gloo with both ranks on one."""
    argv = demo_args(demo_dir, tmp_path, "--perturb", "0", "--raw_noise_std", "0", "--seed", "4",
                     "--N_iters", "20", "--i_weights", "20", *CUDA)
    assert run_nerf.main([*argv, "--expname", "one"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "run_nerf.py"), *argv, "--expname", "two"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = final_state(tmp_path / "one", 20), final_state(tmp_path / "two", 20)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=ROUNDING_ATOL)
