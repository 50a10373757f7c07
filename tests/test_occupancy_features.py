"""The project's features on top of the occupancy sampler (issue 26: "everything
keeps working on top of it"): `--mixed_precision`, `--compile`, out-of-memory
chunk halving and chunk sizes, the live viewer, and `--render_only`'s depth
maps of the test views and of a camera path, and view.py. The sampler itself:
tests/test_occupancy.py."""
import logging
import math
import os
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import run_nerf
import test_camera_path
from nerf import flags, occupancy, rendering
from nerf.datasets import load_scene
from nerf.rendering import RenderMemory, render_path
from run_nerf_helpers import get_rays
from conftest import ROUNDING_ATOL
from test_cli import QUIET, TINY
from test_demo_run import demo_dir  # noqa: F401 (fixture)
from test_devices import RunsOutOfMemory

# A grid the demo's runs build and march quickly: 16^3 cells, 128 steps across the box.
OCCUPANCY = ["--sampler", "occupancy", "--occupancy_resolution", "16", "--occupancy_warmup", "2",
             "--occupancy_interval", "2", "--occupancy_cells", "512", "--occupancy_steps", "128"]


def demo_argv(demo_dir: Path, basedir: Path, *extra: str) -> list:  # noqa: F811
    return ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(basedir), "--expname", "demo",
            "--white_bkgd", "--testskip", "1", "--seed", "4", *TINY, *QUIET, *OCCUPANCY, *extra]


def networks_with_a_grid(demo_dir: Path, *extra: str, seed: int = 4):  # noqa: F811
    """The demo's scene and fresh networks (drawn from `seed`) with an occupancy
    grid built from them, as a run makes them: (scene, train kwargs, test kwargs, optimizer, args)."""
    args = flags.parse_args(run_nerf.config_parser(), demo_argv(demo_dir, demo_dir.parent, *extra))
    scene = load_scene(args)
    np.random.seed(seed)
    torch.manual_seed(seed)
    train, test, _, _, optimizer = run_nerf.create_nerf(args, torch.device("cpu"))
    for kwargs in (train, test):
        kwargs.update(near=scene.near, far=scene.far)
    occupancy.attach(args, scene, train, test, None, None, torch.device("cpu"), rendering_only=True)
    assert test["occupancy"].ready and not test["occupancy"].binary.all()
    return scene, train, test, optimizer, args


# --- chunk sizes and out-of-memory halving ---------------------------------------------

# Another chunk size gives the network calls other row counts, and the CPU's matrix products other blocks:
# measured, the maps differ by at most 1.5e-7 (2 float32 ulps of 1) over the chunk sizes below; a wrong
# sample or weight moves a pixel by 1e-3 or more.
CHUNK_ATOL = 1e-6


def test_out_of_memory_with_the_occupancy_sampler_halves_the_chunk_and_keeps_the_frames(demo_dir, caplog):  # noqa: F811
    """A device that holds 1000 packed samples at once: the render's chunk and
    netchunk halve until a chunk's samples fit, and the frames are those of a
    render that never ran out (to float32's rounding: `CHUNK_ATOL`)."""
    scene, _, kwargs, _, _ = networks_with_a_grid(demo_dir)
    poses, hwf = scene.poses[scene.i_test[:2]], scene.hwf
    reference = render_path(poses, hwf, scene.K, 1 << 15, kwargs, progress=False)
    tight = RunsOutOfMemory(kwargs["network_query_fn"], limit=1000)
    memory = RenderMemory(1 << 15, tight)
    with caplog.at_level(logging.WARNING, logger="nerf"):
        rgbs, disps = render_path(poses, hwf, scene.K, 1 << 15, {**kwargs, "network_query_fn": tight},
                                  memory=memory, progress=False)
    np.testing.assert_allclose(rgbs, reference[0], rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(disps, reference[1], rtol=0, atol=CHUNK_ATOL)
    # Halved no further than it had to: a chunk of twice the rays, at most 16 samples each, ran out.
    assert tight.limit < 32 * memory.chunk < 32 * (1 << 15)
    warnings = [r.getMessage() for r in caplog.records if "out of device memory" in r.getMessage()]
    assert len(warnings) == 1 and f"--chunk {memory.chunk} " in warnings[0]


def rays_in_and_out(scene):
    """Rays of a test view (every sixth pixel) and as many turned away from the
    scene (they leave the box without a sample): rays_o, rays_d (N, 3)."""
    c2w = torch.as_tensor(scene.poses[scene.i_test[0]], dtype=torch.float32)
    rays_o, rays_d = (r.reshape(-1, 3)[::6] for r in get_rays(scene.H, scene.W, scene.K, c2w))
    away = torch.arange(len(rays_o)) % 2 == 1
    return rays_o, torch.where(away[:, None], -rays_d, rays_d)


@pytest.mark.parametrize("chunk, netchunk", [(1, 1 << 16), (7, 5), (1 << 15, 1)])
def test_chunk_and_netchunk_never_change_the_occupancy_render(demo_dir, chunk, netchunk):  # noqa: F811
    """Rays split into chunks of 1 to all of them, and packed samples into
    network calls of 1 to 65536 (fewer than a ray's samples, so that a ray's
    samples straddle calls): the same pixels, to float32's rounding (`CHUNK_ATOL`). Half the
    rays leave the box without a sample, so many a chunk holds no sample at all."""
    scene, _, kwargs, _, _ = networks_with_a_grid(demo_dir)
    rays_o, rays_d = rays_in_and_out(scene)
    query = rendering.make_network_query_fn(kwargs["network_query_fn"].embed_fn,
                                            kwargs["network_query_fn"].embeddirs_fn, netchunk)
    with torch.no_grad():
        want = rendering.render(scene.H, scene.W, scene.K, chunk=1 << 15, rays=(rays_o, rays_d), **kwargs)
        got = rendering.render(scene.H, scene.W, scene.K, chunk=chunk, rays=(rays_o, rays_d),
                               **{**kwargs, "network_query_fn": query})
    near, far = torch.full_like(rays_o[:, :1], scene.near), torch.full_like(rays_o[:, :1], scene.far)
    ray, _, _ = kwargs["occupancy"].march(rays_o, rays_d, near, far, False, 16)
    counts = torch.zeros(len(rays_o), dtype=torch.long).index_add_(0, ray, torch.ones_like(ray))
    assert (counts == 0).sum() >= len(rays_o) // 2 and counts.max() > 5     # rays straddle calls of 1 and 5
    for name, a, b in zip(("rgb", "disp", "acc"), got[:3], want[:3]):
        assert torch.allclose(a, b, rtol=0, atol=CHUNK_ATOL), (name, float((a - b).abs().max()))


def test_a_training_batch_without_a_single_sample_takes_its_step(demo_dir):  # noqa: F811
    """Every ray of the batch leaves the box unsampled: the step's colours are
    the background and its gradients zero, rather than a failed query."""
    scene, train, _, optimizer, args = networks_with_a_grid(demo_dir)
    rays_o, rays_d = rays_in_and_out(scene)
    away = torch.stack([rays_o[1::2], rays_d[1::2]])
    stats = run_nerf.train_step(away, torch.zeros(away.shape[1], 3), scene, train, optimizer, args.chunk)
    assert float(stats["loss"]) == 1.0                      # white background against black
    assert all(p.grad is None or not p.grad.any() for p in train["network_fine"].parameters())


# --- what a fork's edit reaches (docs/compatibility.md) ---------------------------------------

def test_a_forks_raw2outputs_and_render_rays_reach_the_default_sampler_only(demo_dir, monkeypatch):  # noqa: F811
    """`run_nerf.raw2outputs = f` and `run_nerf.render_rays = f` are called by the
    default sampler's render and not by the occupancy sampler's (it composites
    with `composite_packed`), while `sample_alpha` and `finish_maps`, which
    both compositings share, are called by both."""
    scene, _, kwargs, _, _ = networks_with_a_grid(demo_dir)
    rays = rays_in_and_out(scene)
    calls = {name: [] for name in ("raw2outputs", "render_rays", "sample_alpha", "finish_maps")}
    for name in calls:
        original = getattr(rendering, name)
        monkeypatch.setattr(run_nerf if name in ("raw2outputs", "render_rays") else rendering, name,
                            lambda *a, _f=original, _calls=calls[name], **k: _calls.append(1) or _f(*a, **k))
    for sampler, render_kwargs in (("occupancy", kwargs), ("hierarchical", {k: v for k, v in kwargs.items()
                                                                             if k != "occupancy"})):
        for made in calls.values():
            made.clear()
        with torch.no_grad():
            rendering.render(scene.H, scene.W, scene.K, chunk=1 << 15, rays=rays, **render_kwargs)
        reached = {name for name, made in calls.items() if made}
        assert reached == ({"sample_alpha", "finish_maps"} if sampler == "occupancy" else set(calls)), sampler


# --- --mixed_precision -----------------------------------------------------------------------

class CompositingSpy:
    """Stands in for `rendering.composite_packed` and keeps each call's inputs and maps (detached)."""

    def __init__(self, monkeypatch):
        self.real, self.calls = rendering.composite_packed, []
        monkeypatch.setattr(rendering, "composite_packed", self)

    def __call__(self, raw, t, delta, ray_index, n_rays, *args, **kwargs):
        out = self.real(raw, t, delta, ray_index, n_rays, *args, **kwargs)
        self.calls.append(((raw.detach(), t, delta, ray_index, n_rays, *args),
                           {k: v.detach() for k, v in out.items()}))
        return out


def occupancy_training_steps(demo_dir: Path, n_steps: int, *extra: str):  # noqa: F811
    """`n_steps` training steps of the fresh networks of seed 4 with the grid's
    upkeep before each (built from them, then an update every second step), on
    the rays and random draws of seed 0: the steps' losses and the grid."""
    scene, train, _, optimizer, args = networks_with_a_grid(demo_dir, "--raw_noise_std", "0", *extra)
    sampler = run_nerf.make_sampler(args, scene, torch.device("cpu"))
    torch.manual_seed(0)
    losses = []
    for i in range(1, n_steps + 1):
        batch_rays, target = sampler(i)
        occupancy.before_step(train, i)
        losses.append(float(run_nerf.train_step(batch_rays, target, scene, train, optimizer, args.chunk)["loss"]))
    return np.array(losses), train["occupancy"]


# Measured over the fresh networks of seeds 1, 2, 4, 6, 7, 8 (4 steps): the bfloat16 networks' losses are
# the float32 ones' within 1.0e-3 relative (the default sampler's: 1.6e-3 over 8 steps), their grids mark
# other cells in 0.4 % to 2.3 % of the occupied ones where the networks are alive (0.5 % at seed 4; up to 20 %
# where nearly every density is zero and every cell is at the threshold). Packed maps against float64:
# 1.8e-7. A bfloat16 transmittance would be ~1e-2 off.
MIXED_LOSS_RTOL = 1e-2
MIXED_CELLS = 0.05
COMPOSITING_ATOL = 1e-5


def test_mixed_precision_steps_with_the_occupancy_sampler_stay_close_to_float32(demo_dir, monkeypatch):  # noqa: F811
    """Four steps from the same networks, rays and jitter, in float32 and under
    --mixed_precision (the networks in bfloat16, the grid built and updated from
    them too): the losses agree to bfloat16's precision and differ (bfloat16 ran),
    the grids mark nearly the same cells, and the packed compositing stays in
    float32: its inputs and maps are float32, and its maps those of a float64
    compositing of the same network outputs."""
    exact, grid = occupancy_training_steps(demo_dir, 4)
    spy = CompositingSpy(monkeypatch)
    mixed, mixed_grid = occupancy_training_steps(demo_dir, 4, "--mixed_precision")
    assert grid.ready and mixed_grid.ready
    np.testing.assert_allclose(mixed, exact, rtol=MIXED_LOSS_RTOL)
    assert not np.array_equal(mixed, exact)
    assert (grid.binary != mixed_grid.binary).sum() < MIXED_CELLS * grid.binary.sum()
    assert len(spy.calls) == 4            # every step marches: the grid was built from the fresh networks
    for (raw, t, delta, ray_index, n_rays, *rest), maps in spy.calls:
        assert raw.dtype == t.dtype == delta.dtype == torch.float32
        wide = spy.real(raw.double(), t.double(), delta.double(), ray_index, n_rays, *rest)
        for name, value in maps.items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(value.double(), wide[name], rtol=0, atol=COMPOSITING_ATOL)


# --- --compile --------------------------------------------------------------------------------

def compiled_run(demo_dir: Path, basedir: Path, monkeypatch, backend=None, n_steps: int = 6):  # noqa: F811
    """A run of `n_steps` (warm-up 2, then marching) with --compile (through
    `backend` when given) and one with the plain path uncompiled; the
    compilations counted before each step, the packed sample counts of each
    marching step, and the two runs' final checkpoints."""
    compilations, counts = [], []
    real_compile = torch.compile

    def counted(gm, example_inputs):
        compilations.append(len(example_inputs))
        return gm.forward if backend is None else backend(gm, example_inputs)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend=counted, **kw))
    real_before = occupancy.before_step
    monkeypatch.setattr(occupancy, "before_step", lambda kwargs, i: counts.append(len(compilations))
                        or real_before(kwargs, i))
    spy = CompositingSpy(monkeypatch)
    common = ["--N_iters", str(n_steps), "--i_weights", str(n_steps)]
    assert run_nerf.main(demo_argv(demo_dir, basedir, "--expname", "plain", "--fast_path", "off", *common)) == 0
    spy.calls.clear()
    counts.clear()
    assert run_nerf.main(demo_argv(demo_dir, basedir, "--expname", "compiled", "--compile", *common)) == 0
    counts.append(len(compilations))
    checkpoints = [torch.load(basedir / name / f"{n_steps:06d}.tar", weights_only=True)
                   for name in ("plain", "compiled")]
    return counts, [len(args[1]) for args, _ in spy.calls], checkpoints


def network_weights(ckpt: dict) -> dict:
    return {f"{net}.{k}": v for net in ("network_fn", "network_fine") for k, v in ckpt[f"{net}_state_dict"].items()}


def test_compiled_networks_take_each_steps_packed_samples_without_recompiling(
        demo_dir, tmp_path, monkeypatch):  # noqa: F811
    """--compile with the occupancy sampler, whose packed sample count changes
    every step: the networks are compiled for the warm-up's batches and once
    more, with a dynamic row count, when marching starts, and never again
    (a compilation a step would stop at torch's recompile limit and fall back
    to eager). What the compiled graphs compute is the plain path's, bit for
    bit (the graphs run eagerly here; the compiler's own code: the slow test below)."""
    counts, samples, (plain, compiled) = compiled_run(demo_dir, tmp_path, monkeypatch)
    assert len(samples) == 4 and len(set(samples)) >= 3, samples  # steps 3..6 march, with changing counts
    assert counts[3] > counts[2] >= 1                             # compiled in the warm-up, again at step 3
    assert counts[3:] == [counts[3]] * len(counts[3:]), counts    # and never after
    a, b = network_weights(plain), network_weights(compiled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(plain["occupancy_grid"]["density"], compiled["occupancy_grid"]["density"])


needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")),
    reason="torch.compile's CPU backend needs a C++ compiler")


@pytest.mark.slow
@needs_compiler
def test_inductor_compiled_occupancy_run_equals_the_uncompiled_one(demo_dir, tmp_path, monkeypatch):  # noqa: F811
    """The same with torch.compile's own code generator (inductor): 4 steps,
    the weights those of the uncompiled plain path to rounding."""
    from torch._inductor.compile_fx import compile_fx
    counts, samples, (plain, compiled) = compiled_run(demo_dir, tmp_path, monkeypatch, backend=compile_fx, n_steps=4)
    assert counts[3:] == [counts[3]] * len(counts[3:]), counts
    a, b = network_weights(plain), network_weights(compiled)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < ROUNDING_ATOL              # measured: 1.5e-8 after 4 and after 6 steps


# --- the live viewer ------------------------------------------------------------------------

def test_the_viewer_draws_what_render_draws_with_the_occupancy_grid(demo_dir):  # noqa: F811
    """From a test camera at its own size, the viewer's picture (slices of 64
    rays, as it renders between training steps) is `render`'s with the same
    grid, to float32's rounding; a camera turned away from the scene (no ray
    meets the box) shows the white background rather than failing."""
    from nerf import viewer
    scene, _, kwargs, _, _ = networks_with_a_grid(demo_dir)
    pose = scene.poses[scene.i_test[1]]
    fov = 2 * math.atan(0.5 * scene.H / scene.focal)
    with torch.no_grad():
        want = rendering.render(scene.H, scene.W, scene.K, chunk=1 << 15, c2w=torch.as_tensor(pose), **kwargs)
    rays_o, rays_d = viewer.browser_rays(pose, fov, scene.H, scene.W, "cpu")
    slices = [viewer.render_world_rays(scene, kwargs, rays_o[i:i + 64], rays_d[i:i + 64])
              for i in range(0, len(rays_o), 64)]
    for got, expected in zip((torch.cat(maps) for maps in zip(*slices)), want[:3]):
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=CHUNK_ATOL)
    away = pose.copy()
    away[:3, :3] = pose[:3, :3] @ np.diag([-1.0, 1.0, -1.0])        # turned around its up axis
    rgb, _, acc = viewer.render_world_rays(scene, kwargs, *viewer.browser_rays(away, fov, 8, 8, "cpu"))
    assert torch.equal(acc, torch.zeros(64)) and torch.equal(rgb, torch.ones(64, 3))


def test_training_with_a_watching_viewer_and_the_occupancy_sampler_trains_exactly_as_without(
        demo_dir, tmp_path, monkeypatch):  # noqa: F811
    """The viewer renders between training steps, during the warm-up and after
    the grid is built, through the grid the run keeps up: no random number is
    drawn and the grid is only read, so the weights and the grid come out bit
    for bit those of a run without it."""
    pytest.importorskip("viser", reason="viser is not installed (pip install -r requirements-viewer.txt)")
    from test_viewer import free_port, watch_training
    rendered = []
    watch_training(monkeypatch, lambda live, picture: rendered.append(live.render_kwargs["occupancy"].ready))
    for name, extra in (("plain", []), ("watched", ["--viewer", "--viewer_port", str(free_port())])):
        assert run_nerf.main(demo_argv(demo_dir, tmp_path, "--expname", name, "--N_iters", "6",
                                       "--i_weights", "6", *extra)) == 0
    assert False in rendered and rendered.count(True) >= 2      # pictures in the warm-up and after it
    plain, watched_ckpt = (torch.load(tmp_path / name / "000006.tar", weights_only=True)
                           for name in ("plain", "watched"))
    a, b = network_weights(plain), network_weights(watched_ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("density", "generator"):
        assert torch.equal(plain["occupancy_grid"][key], watched_ckpt["occupancy_grid"][key]), key


# --- --render_only: depth maps of the test views and of a camera path --------------------------

trained_demo = test_camera_path.trained_demo     # the fixture, shared with test_camera_path.py and test_viewer.py

# Measured on the trained demo's 3 test views (depths 3.3 to 4.5 on 17-19 % of the pixels; a marching step
# 0.027 long, the default's coarse samples 0.25 apart): the samplers disagree on which pixels have a depth
# (opacity >= 0.5) in 0.6-0.8 % of the pixels, and where both have one their depths differ by 0.024-0.032
# in the median and 0.21 at most (at the solids' edges).
DEPTH_MASK_SHARE = 0.03
DEPTH_MEDIAN = 0.1
DEPTH_MAX = 0.6


def test_render_only_depth_maps_with_the_occupancy_sampler(trained_demo, tmp_path):
    """The trained demo (300 steps with the default sampler) rendered with
    --render_only --render_test by both samplers (the occupancy grid built from
    the network): the depth maps agree to the measured tolerance, and
    --camera_path through the test cameras gives the occupancy sampler's
    --render_test frames and depth maps."""
    demo_dir, basedir = trained_demo
    for name in ("hierarchical", "occupancy"):
        (tmp_path / name).mkdir()
        shutil.copy(basedir / "demo" / "000300.tar", tmp_path / name)
    grid = ["--sampler", "occupancy", "--occupancy_resolution", "32", "--occupancy_steps", "256"]
    path_file = test_camera_path.write_test_view_path(demo_dir, tmp_path / "camera_path.json")
    for name, extra in (("hierarchical", ["--render_test"]), ("occupancy", [*grid, "--render_test"]),
                        ("occupancy", [*grid, "--camera_path", str(path_file)])):
        assert run_nerf.main(test_camera_path.demo_args(demo_dir, tmp_path, "--expname", name, "--render_only",
                                                        *extra)) == 0
    default, occupied, path = (tmp_path / name / f"renderonly_{kind}_000300" for name, kind in
                               (("hierarchical", "test"), ("occupancy", "test"), ("occupancy", "camera_path")))
    for k in range(3):
        a, b = np.load(default / "depth" / f"{k:03d}.npy"), np.load(occupied / "depth" / f"{k:03d}.npy")
        both = ~np.isnan(a) & ~np.isnan(b)
        assert both.mean() > 0.1 and (np.isnan(a) != np.isnan(b)).mean() < DEPTH_MASK_SHARE
        assert np.median(np.abs(a - b)[both]) < DEPTH_MEDIAN and np.abs(a - b)[both].max() < DEPTH_MAX
        np.testing.assert_allclose(np.load(path / "depth" / f"{k:03d}.npy"), b, rtol=1e-4, equal_nan=True)
        frames = [imageio.imread(folder / f"{k:03d}.png").astype(int) for folder in (path, occupied)]
        assert np.abs(frames[0] - frames[1]).max() <= 1


# --- view.py ---------------------------------------------------------------------------------

def test_view_py_shows_an_occupancy_trained_network_through_its_fine_network_or_its_grid(
        demo_dir, tmp_path, monkeypatch):  # noqa: F811
    """view.py takes the run's sampler as --render_only does: a network
    trained with the occupancy sampler lends its fine network to the default
    sampler's coarse pass (its coarse one stopped learning after the warm-up),
    and with --sampler occupancy the viewer marches the checkpoint's grid."""
    pytest.importorskip("viser", reason="viser is not installed (pip install -r requirements-viewer.txt)")
    import view
    from test_viewer import free_port
    argv = demo_argv(demo_dir, tmp_path)
    assert run_nerf.main(argv + ["--N_iters", "6", "--i_weights", "6"]) == 0
    shown = []

    class Shown:
        def __init__(self, scene, render_kwargs, *args):
            shown.append(render_kwargs)

        def serve_forever(self):
            raise KeyboardInterrupt

        def stop(self):
            pass

    monkeypatch.setattr(view, "Viewer", Shown)
    for sampler in ("hierarchical", "occupancy"):
        assert view.view(argv + ["--sampler", sampler, "--port", str(free_port())]) == 0
    default, marched = shown
    assert default["network_fn"] is default["network_fine"] and "occupancy" not in default
    saved = torch.load(tmp_path / "demo" / "000006.tar", weights_only=True)["occupancy_grid"]
    assert marched["occupancy"].ready and torch.equal(marched["occupancy"].density, saved["density"])
