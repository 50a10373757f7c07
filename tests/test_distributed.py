"""Data-parallel training with torchrun on the CPU (gloo, 2 processes): the
same steps as one process, exact resumption of a killed run, the same
rendered frames, and one message for bad input."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import run_nerf
from test_cli import fern_args
from test_demo_run import demo_args, demo_dir  # noqa: F401 (fixture)
from conftest import ROUNDING_ATOL
from test_robustness import assert_same_weights, weights

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# No sampling noise; seed 4 starts both tiny networks with some positive density (at seed 0 the fine one
# has none at all, so it would get no gradient and compare trivially).
EXACT = ["--perturb", "0", "--raw_noise_std", "0", "--seed", "4"]

pytestmark = pytest.mark.slow


def torchrun_cmd(argv, nproc: int = 2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(REPO / "run_nerf.py"), *argv]


def torchrun(argv, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(argv, nproc), capture_output=True, text=True, env=ENV, timeout=300)




def one_process(argv) -> int:
    """run_nerf.main(argv) in this process with one thread, as each torchrun worker has (ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_nerf.main(argv)
    finally:
        torch.set_num_threads(threads)


def assert_close_weights(one: Path, two: Path, atol: float = ROUNDING_ATOL) -> None:
    """The two checkpoints' weights agree within atol, and every parameter
    of both networks was trained (a non-zero Adam moment)."""
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for part in ("network_fn_state_dict", "network_fine_state_dict"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], rtol=0, atol=atol), f"{part} {k}"
    moments = a["optimizer_state_dict"]["state"].values()
    assert len(moments) == len(a["network_fn_state_dict"]) + len(a["network_fine_state_dict"])
    assert min(float(v["exp_avg"].abs().max()) for v in moments) > 0


@pytest.fixture(scope="module")
def runs(fern_dir, tmp_path_factory):
    """A 20-step fern run with one process and with two, ray batching, no noise."""
    base = tmp_path_factory.mktemp("ddp")
    argv = fern_args(fern_dir, base, *EXACT, "--N_iters", "20", "--i_weights", "20", "--i_print", "10")
    assert one_process([*argv, "--expname", "one"]) == 0
    two = torchrun([*argv, "--expname", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    return base, argv, two


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(runs):
    base, _, two = runs
    assert_close_weights(base / "one" / "000020.tar", base / "two" / "000020.tar")
    ckpt = torch.load(base / "two" / "000020.tar", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])   # own noise streams
    assert "world_size = 2" in (base / "two" / "args.txt").read_text().splitlines()
    # Rank 0 alone talks: each progress line once.
    assert two.stdout.count("[TRAIN] Iter: 10 ") == 1 and two.stdout.count("[TRAIN] Iter: 20 ") == 1


@pytest.mark.slow
def test_two_processes_without_batching_take_the_steps_of_one(fern_dir, tmp_path):
    argv = fern_args(fern_dir, tmp_path, *EXACT, "--no_batching", "--N_iters", "20", "--i_weights", "20")
    assert one_process([*argv, "--expname", "one"]) == 0
    two = torchrun([*argv, "--expname", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close_weights(tmp_path / "one" / "000020.tar", tmp_path / "two" / "000020.tar")


@pytest.mark.slow
def test_across_an_epoch_end_with_an_empty_share_two_processes_take_the_steps_of_one(demo_dir, tmp_path):  # noqa: F811
    """The demo scene's 10 views of 24 x 24 hold 5760 rays: 22 batches of 256,
    then one of 128, all of it rank 0's share and none of rank 1's, then a
    new permutation (drawn on rank 0, shared)."""
    argv = demo_args(demo_dir, tmp_path, *EXACT, "--N_iters", "26", "--i_weights", "26")
    assert one_process([*argv, "--expname", "one"]) == 0
    two = torchrun([*argv, "--expname", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close_weights(tmp_path / "one" / "000026.tar", tmp_path / "two" / "000026.tar")
    one, two = (torch.load(tmp_path / name / "000026.tar", weights_only=True)["sampler_state"] for name in ("one", "two"))
    assert one["i_batch"] == two["i_batch"] == 3 * 256 and torch.equal(one["perm"], two["perm"])


@pytest.mark.slow
def test_two_processes_render_the_frames_of_one(runs):
    base, argv, _ = runs
    render = [*argv, "--expname", "two", "--render_only", "--render_test"]
    two = torchrun(render)
    assert two.returncode == 0, two.stderr[-3000:]
    folder = base / "two" / "renderonly_test_000020"
    os.rename(folder, base / "two" / "rendered_by_two")
    assert run_nerf.main(render) == 0
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["000.png", "001.png", "002.png"]          # 3 test views over 2 ranks, in order
    for name in names:
        assert np.array_equal(iio.imread(folder / name), iio.imread(base / "two" / "rendered_by_two" / name)), name


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_says_so(runs, caplog):
    base, argv, _ = runs
    with caplog.at_level("INFO", logger="nerf"):
        assert run_nerf.main([*argv, "--expname", "two", "--N_iters", "21", "--i_weights", "21"]) == 0
    assert "written by 2 process(es), this run has 1" in caplog.text
    resumed = torch.load(base / "two" / "000021.tar", weights_only=True)
    assert resumed["world_size"] == 1 and resumed["global_step"] == 21
    saved = torch.load(base / "two" / "000020.tar", weights_only=True)
    assert torch.equal(resumed["sampler_state"]["perm"], saved["sampler_state"]["perm"])   # same batches go on
    assert resumed["sampler_state"]["i_batch"] == saved["sampler_state"]["i_batch"] + 256


def rank_pids(launcher: subprocess.Popen) -> dict:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0][5:])] = int(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker ranks")
@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_and_resume_is_exact(fern_dir, tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop at the same step, rank 0 saves
    it once (with both ranks' generators), and resuming with 2 processes
    continues exactly as a run that was never stopped (noise on: each rank's
    own jitter and density-noise stream)."""
    def argv(basedir, *extra):
        return [*fern_args(fern_dir, basedir, "--N_rand", "128"), *extra]

    log = open(tmp_path / "out.txt", "w+")
    proc = subprocess.Popen(torchrun_cmd(argv(tmp_path / "stopped", "--N_iters", "100000", "--i_weights", "1000000",
                                              "--i_print", "1")),
                            stdout=subprocess.PIPE, stderr=log, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        for line in proc.stdout:
            if line.startswith("[TRAIN] Iter: 3 ") or time.time() > deadline:
                break
        assert line.startswith("[TRAIN] Iter: 3 "), "training never got under way"
        os.kill(rank_pids(proc)[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.terminate()                   # torchrun then ends its workers
            proc.wait(timeout=60)
    log.seek(0)
    err = log.read()
    assert proc.returncode != 0
    saved = re.findall(r"Interrupted: saved step (\d+)", out)
    assert len(saved) == 1, out + err
    step = int(saved[0])
    assert [p.name for p in (tmp_path / "stopped" / "fern").glob("*.tar")] == [f"{step:06d}.tar"]
    assert f'File "{REPO}' not in err            # no traceback through our code (torchrun prints its own)

    final = str(step + 3)
    resumed = torchrun(argv(tmp_path / "stopped", "--N_iters", final, "--i_weights", final))
    straight = torchrun(argv(tmp_path / "straight", "--N_iters", final, "--i_weights", final))
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr[-2000:] + straight.stderr[-2000:]
    name = f"{step + 3:06d}.tar"
    assert_same_weights(weights(tmp_path / "stopped" / "fern" / name), weights(tmp_path / "straight" / "fern" / name))


def test_rays_that_do_not_split_over_the_processes_are_one_error_line(fern_dir, tmp_path):
    proc = torchrun(fern_args(fern_dir, tmp_path, "--N_rand", "255", "--N_iters", "1"))
    assert proc.returncode != 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: --N_rand" in line]
    assert ours == ["error: --N_rand: 255 rays per step do not split evenly over 2 processes; use a multiple of 2"]
    assert not (tmp_path / "fern").exists()


def test_the_rounding_tolerance_is_far_below_one_step_on_other_rays(demo_dir, tmp_path):  # noqa: F811
    """ROUNDING_ATOL sees a single step taken on other rays (half the batch): the
    2-process tests above would notice a rank's share lost or misplaced."""
    argv = demo_args(demo_dir, tmp_path, *EXACT, "--N_iters", "1", "--i_weights", "1")
    assert one_process([*argv, "--expname", "all"]) == 0
    assert one_process([*argv, "--expname", "half", "--N_rand", "128"]) == 0
    a, b = (torch.load(tmp_path / name / "000001.tar", weights_only=True) for name in ("all", "half"))
    moved = max(float((a[p][k] - b[p][k]).abs().max()) for p in ("network_fn_state_dict", "network_fine_state_dict")
                for k in a[p])
    assert moved > 5 * ROUNDING_ATOL
