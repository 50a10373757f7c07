"""GPU-only situations checked on the CPU: a checkpoint written on a CUDA
device, out-of-memory while rendering and while training, and the --device
flag. (The same paths on a real GPU: tests/test_gpu.py, scripts/gpu_check.sh.)"""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from nerf import checkpoints
import run_nerf
from nerf.rendering import RenderMemory, make_network_query_fn, render_path
from run_nerf_helpers import NeRF, get_embedder
from test_demo_run import demo_args, demo_dir  # noqa: F401 (fixture)
from test_resume import final_state


class _TagAsCuda:
    """While active, torch.save records every storage as living on cuda:0,
    as a checkpoint written by a CUDA run does; loading such a file without
    map_location fails on a machine without CUDA."""

    def __init__(self):
        self.active = False
        torch.serialization.register_package(0, self.tag, lambda storage, location: None)

    def tag(self, storage):
        return "cuda:0" if self.active else None


_cuda_tagger = _TagAsCuda()


def save_as_if_on_cuda(ckpt: dict, path: Path) -> None:
    _cuda_tagger.active = True
    try:
        torch.save(ckpt, path)
    finally:
        _cuda_tagger.active = False


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the tagged storages load on the GPU")
def test_checkpoint_written_on_cuda_resumes_exactly_on_the_cpu(demo_dir, tmp_path, caplog):  # noqa: F811
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", "straight", "--N_iters", "4",
                                   "--i_weights", "4")) == 0
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", "gpu", "--N_iters", "2", "--i_weights", "2")) == 0
    ckpt = torch.load(tmp_path / "gpu" / "000002.tar", weights_only=True)
    ckpt["rng_state"]["device_type"] = "cuda"                   # and a CUDA generator state beside the CPU's
    ckpt["rng_state"]["device_rng"] = torch.zeros(16, dtype=torch.uint8)
    ckpt["rng_states"] = [ckpt["rng_state"]]
    save_as_if_on_cuda(ckpt, tmp_path / "gpu" / "000002.tar")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "gpu" / "000002.tar", weights_only=True)   # the file really says cuda

    with caplog.at_level(logging.INFO, logger="nerf"):
        assert run_nerf.main(demo_args(demo_dir, tmp_path, "--expname", "gpu", "--N_iters", "4",
                                       "--i_weights", "4")) == 0
    assert "written on another kind of device" in caplog.text
    straight, resumed = final_state(tmp_path / "straight", 4), final_state(tmp_path / "gpu", 4)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_generator_states_are_cpu_tensors_and_round_trip():
    state = checkpoints.rng_state(torch.device("cpu"))
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    expected = (torch.rand(3), np.random.rand(3))
    assert checkpoints.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


class RunsOutOfMemory:
    """A network query that raises torch.OutOfMemoryError, like a GPU that
    is too small, whenever one call holds more than `limit` points."""

    def __init__(self, query, limit: int):
        self.query, self.limit, self.calls = query, limit, []

    @property
    def netchunk(self):
        return self.query.netchunk

    @netchunk.setter
    def netchunk(self, value):
        self.query.netchunk = value

    def __call__(self, inputs, viewdirs, network_fn, density_only=False):
        points = inputs.shape[0] * inputs.shape[1]
        self.calls.append((points, self.netchunk))
        if points > self.limit or self.netchunk > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {points * 1024} bytes")
        return self.query(inputs, viewdirs, network_fn, density_only=density_only)


def small_render_kwargs(query) -> dict:
    torch.manual_seed(0)
    net = NeRF(D=2, W=16, input_ch=get_embedder(2)[1], input_ch_views=0, output_ch=5)   # as create_nerf makes it
    return {"network_query_fn": query, "network_fn": net,
            "network_fine": None, "N_samples": 8, "N_importance": 4, "perturb": False, "raw_noise_std": 0.0,
            "use_viewdirs": False, "white_bkgd": False, "ndc": False, "near": 2.0, "far": 6.0}


def test_render_out_of_memory_halves_chunk_and_netchunk_and_gives_the_same_frames(caplog):
    embed_fn, _ = get_embedder(2)
    H, W, focal = 12, 16, 14.0
    K = np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    poses = torch.eye(4)[None].repeat(3, 1, 1)
    poses[:, 2, 3] = torch.tensor([4.0, 4.5, 5.0])
    reference = render_path(poses, [H, W, focal], K, 7, small_render_kwargs(make_network_query_fn(embed_fn, None, 50)))

    tight = RunsOutOfMemory(make_network_query_fn(embed_fn, None, 4096), limit=40 * 12)
    memory = RenderMemory(4096, tight)
    with caplog.at_level(logging.WARNING, logger="nerf"):
        rgbs, disps = render_path(poses, [H, W, focal], K, 4096, small_render_kwargs(tight), memory=memory)
    assert np.array_equal(rgbs, reference[0]) and np.array_equal(disps, reference[1])
    assert memory.chunk * 12 <= 40 * 12 < 2 * memory.chunk * 12       # halved just until it fits
    assert tight.netchunk <= 40 * 12
    warnings = [r.getMessage() for r in caplog.records if "out of device memory" in r.getMessage()]
    assert len(warnings) == 1 and f"--chunk {memory.chunk} " in warnings[0]
    # Later frames start from the halved sizes: only the first frame's tries failed.
    failures = [c for c in tight.calls if c[0] > tight.limit or c[1] > tight.limit]
    assert len(failures) == len({c for c in failures})


def test_training_step_out_of_memory_is_one_line_naming_n_rand(demo_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 7.79 GiB total)")
    monkeypatch.setattr(run_nerf, "train_step", too_big)
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--N_iters", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --N_rand: a training step of ")
    assert "2.50 GiB" in err[-1] and "--netchunk" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not list((tmp_path / "demo").glob("*.tar"))


@pytest.mark.parametrize("flag, message", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:x", "unknown device 'cuda:x'"),
    pytest.param("cuda", "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_device_is_one_line(demo_dir, tmp_path, capsys, flag, message):  # noqa: F811
    assert run_nerf.main(demo_args(demo_dir, tmp_path, "--N_iters", "1", "--device", flag)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device: ") and message in err[0]
    assert not (tmp_path / "demo").exists()


def test_mps_out_of_memory_is_recognised_and_other_errors_pass_through():
    """MPS reports out of memory as a plain RuntimeError; anything else is a bug to show."""
    memory = RenderMemory(64, make_network_query_fn(get_embedder(2)[0], None, 64))
    tries = []

    def mps_like(chunk):
        tries.append(chunk)
        if chunk > 16:
            raise RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB)")
        return chunk
    assert memory.run(mps_like) == 16 and tries == [64, 32, 16] and memory.network_query_fn.netchunk == 16

    def broken(chunk):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        memory.run(broken)
    assert memory.chunk == 16


def test_data_parallel_on_mps_and_processes_that_resume_from_different_steps_are_refused(monkeypatch, tmp_path):
    from nerf.errors import DataError
    from nerf.flags import choose_device
    from nerf.run_folder import check_same_start
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert choose_device("mps", 0, 1).type == "mps"
    with pytest.raises(DataError, match="--device cpu"):
        choose_device("mps", 1, 2)
    check_same_start([40, 40], tmp_path)
    with pytest.raises(DataError, match="same --basedir"):
        check_same_start([40, 0], tmp_path)


def test_processes_sharing_a_gpu_share_its_training_data_budget(monkeypatch):
    """Every rank of a machine picks the same backend (each alone decides it)."""
    from nerf import parallel
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    four_on_two = [parallel.Ranks(rank=r, world_size=4, local_rank=r, local_world_size=4) for r in range(4)]
    two_on_two = [parallel.Ranks(rank=r, world_size=2, local_rank=r, local_world_size=2) for r in range(2)]
    assert {parallel.backend_for(torch.device("cuda", r.local_rank % 2), r) for r in four_on_two} == {"gloo"}
    assert {parallel.ranks_per_device(torch.device("cuda", r.local_rank % 2), r) for r in four_on_two} == {2}
    assert {parallel.backend_for(torch.device("cuda", r.local_rank), r) for r in two_on_two} == {"nccl"}
    assert {parallel.ranks_per_device(torch.device("cuda", r.local_rank), r) for r in two_on_two} == {1}
    pinned = {parallel.backend_for(torch.device("cuda", 1), r, pinned=True) for r in two_on_two}   # --device cuda:1
    assert pinned == {"gloo"} and parallel.ranks_per_device(torch.device("cuda", 1), two_on_two[0], pinned=True) == 2
    assert parallel.ranks_per_device(torch.device("cpu"), four_on_two[0]) == 1
