"""bench.py's accounting: the products it times are the network's products.

The products' bound is only a bound if the probe performs the products the
step performs: every layer of both networks, for as many points, and for a
render the coarse network only up to its density (as render_path asks).
The network queries a ray that it reports are counted the same way for
both samplers: the default's coarse + fine samples, the occupancy sampler's
packed samples (those of the grid's own march for the same rays), and a
checkpoint is timed with its own networks and grid.
Timings themselves are bench.py's job, not a test's.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import bench
import run_nerf
from nerf import occupancy
from nerf.checkpoints import find_checkpoint, read_checkpoint
from nerf.datasets import load_scene
from nerf.errors import exit_status
from run_nerf_helpers import NeRF, get_embedder, get_rays
from test_demo_run import demo_dir  # noqa: F401 (fixture)


def network(D, W, skips, viewdirs):
    _, input_ch = get_embedder(10)
    _, input_ch_views = get_embedder(4) if viewdirs else (None, 0)
    return NeRF(D=D, W=W, input_ch=input_ch, input_ch_views=input_ch_views, output_ch=5 if not viewdirs else 4,
                skips=skips, use_viewdirs=viewdirs)


def forward_flops(shapes):
    return sum(2 * cin * cout for cin, cout, _ in shapes)


def module_flops(model):
    """2 x in x out over the module's linear layers that a forward pass uses."""
    unused = set() if model.use_viewdirs else set(model.views_linears.modules())
    return sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and m not in unused)


@pytest.mark.parametrize("D, W, skips, viewdirs", [(8, 256, [4], True), (4, 64, [4], True), (4, 64, [2], False)])
def test_product_shapes_are_the_counted_layers(D, W, skips, viewdirs):
    model = network(D, W, skips, viewdirs)
    shapes = bench.layer_shapes(model)
    assert forward_flops(shapes) == module_flops(model)
    # Input gradients: none for the encoded points (nor the skip layer's
    # encoding columns); the views layer's only for the feature.
    assert shapes[0][2] == 0 and all(gin == W for _, _, gin in shapes[1:D])
    if viewdirs:
        views = model.views_linears[0]
        assert (views.in_features, views.out_features, W) in shapes


def test_density_only_shapes_stop_at_sigma():
    model = network(8, 256, [4], True)
    shapes = bench.layer_shapes(model, density_only=True)
    by_hand = 2 * (63 * 256 + 6 * 256 * 256 + (256 + 63) * 256 + 256 * 1)    # 8 layers, the skip's input, alpha
    assert forward_flops(shapes) == by_hand


def test_network_jobs_count_every_sample():
    coarse, fine = network(4, 64, [4], True), network(4, 64, [4], True)
    args = SimpleNamespace(N_samples=32, N_importance=32)
    kw = {"network_fn": coarse, "network_fine": fine}
    assert bench.network_jobs(args, kw, 512, train=True) == [(coarse, 512 * 32, 32, False),
                                                             (fine, 512 * 64, 64, False)]
    assert bench.network_jobs(args, kw, 100, train=False) == [(coarse, 100 * 32, 32, True),
                                                              (fine, 100 * 64, 64, False)]
    per_sample = module_flops(coarse)
    sigma_only = forward_flops(bench.layer_shapes(coarse, density_only=True))
    assert bench.forward_flops_per_ray(args, kw, train=True) == (32 + 64) * per_sample
    assert bench.forward_flops_per_ray(args, kw, train=False) == 32 * sigma_only + 64 * per_sample
    args.N_importance = 0
    assert bench.network_jobs(args, kw, 10, train=False) == [(coarse, 10 * 32, 32, False)]


# --- Network queries per ray, counted for either sampler (issue 26) ---------

TINY_NETS = ["--netdepth", "2", "--netwidth", "16", "--netdepth_fine", "2", "--netwidth_fine", "16", "--N_rand", "64",
             "--occupancy_resolution", "16", "--occupancy_steps", "96", "--perturb", "0"]


def bench_setup(demo_dir, sampler, *extra, others=False):
    """bench.py's implementations on the tiny demo scene (24x24), as its main
    builds them (with `others`, its plain MLP path and the original's too)."""
    bargs, rest = bench.parse(["--config", str(bench.REPO / "configs" / "demo.txt"), "--sampler", sampler, "--",
                               "--datadir", str(demo_dir), *TINY_NETS, *extra])
    args, samplers = bench.run_flags(bargs, rest)
    scene = load_scene(args)
    ckpt_path, ckpt = find_checkpoint(Path(args.basedir), args.ft_path, no_reload=True)
    impls, kw_train = bench.build(args, scene, torch.device("cpu"), samplers, baseline=others, plain=others,
                                  ckpt=ckpt, ckpt_path=ckpt_path)
    return args, scene, impls, kw_train


def captured_batches(impl):
    """Records the ray batches `impl`'s steps train on."""
    batches, sampler = [], impl.sampler

    def sample(i):
        batch = sampler(i)
        batches.append(batch)
        return batch
    impl.sampler = sample
    return batches


def view(scene):
    pose = torch.as_tensor(scene.poses[scene.i_test[0]][:3, :4], dtype=torch.float32)
    return pose, get_rays(scene.H, scene.W, scene.K, pose)


@pytest.mark.parametrize("N_samples, N_importance", [(8, 0), (8, 8), (12, 4)])
def test_hierarchical_queries_per_ray_are_coarse_plus_fine_samples(demo_dir, N_samples, N_importance):  # noqa: F811
    args, scene, impls, kw = bench_setup(demo_dir, "hierarchical", "--N_samples", str(N_samples),
                                         "--N_importance", str(N_importance), others=True)
    assert [impl.name for impl in impls] == ["fast", "plain", "baseline"]
    pose, _ = view(scene)
    # Coarse: N_samples a ray; fine (when there is one): N_samples + N_importance.
    by_hand = N_samples + (N_samples + N_importance if N_importance else 0)
    for impl in impls:
        impl.step(torch.device("cpu"))
        impl.render(scene.H, scene.W, scene.K, pose, torch.device("cpu"))
        assert bench.points(impl.step_jobs[0]) == args.N_rand * by_hand == args.N_rand * bench.samples_per_ray(args)
        # The same jobs, model for model (the plain path's and the original's are twins of the same shapes);
        # a frame's coarse pass counted up to sigma for the original too.
        for counted, formula in [(impl.step_jobs[0], bench.network_jobs(args, kw, args.N_rand, train=True)),
                                 (impl.render_jobs[0], bench.network_jobs(args, kw, scene.H * scene.W, train=False))]:
            assert [job[1:] for job in counted] == [job[1:] for job in formula]
            assert bench.forward_flops(counted) == bench.forward_flops(formula)
    assert impls[0].step_jobs[0] == bench.network_jobs(args, kw, args.N_rand, train=True)


def keep_cells(grid, state: str) -> None:
    """Sets the built grid to a known occupancy: as built, every other cell of
    it, or only the cells within a quarter of the box's diagonal of its centre."""
    if state == "checkerboard":
        grid.binary = grid.binary & (torch.arange(grid.binary.numel()) % 2 == 0)
    elif state == "ball":
        centres = occupancy.cell_centres(grid.lo, grid.hi, grid.resolution)
        grid.binary = grid.binary & ((centres - (grid.lo + grid.hi) / 2).norm(dim=-1) < (grid.hi - grid.lo).norm() / 4)


@pytest.mark.parametrize("state", ["built", "checkerboard", "ball"])
def test_occupancy_queries_per_ray_are_the_marched_samples(demo_dir, state):  # noqa: F811
    args, scene, (impl,), _ = bench_setup(demo_dir, "occupancy", "--N_samples", "16", "--N_importance", "16")
    cpu = torch.device("cpu")
    note = bench.ready_grid(impl, 1, cpu, None)
    grid = impl.grid
    assert grid.ready and "fresh" in note
    keep_cells(grid, state)
    batches = captured_batches(impl)
    budget = args.N_samples                  # the occupancy sampler's samples a ray at most

    def marched(rays_o, rays_d):
        near = torch.full_like(rays_d[:, :1], scene.near)
        far = torch.full_like(rays_d[:, :1], scene.far)
        return grid.march(rays_o, rays_d, near, far, perturb=False, max_per_ray=budget)[0].numel()

    impl.step(cpu)
    rays_o, rays_d = batches[0][0]
    packed = marched(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))
    assert 0 < packed < args.N_rand * budget or state == "built"
    fine = impl.kw_train["network_fine"]
    # One network (the fine one) queried at the packed points, its FLOPs those points' FLOPs.
    assert impl.step_jobs[0] == [(fine, packed, 1, False)]
    assert bench.forward_flops(impl.step_jobs[0]) == packed * module_flops(fine)
    pose, (rays_o, rays_d) = view(scene)
    impl.render(scene.H, scene.W, scene.K, pose, cpu)
    assert bench.points(impl.render_jobs[0]) == marched(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))


@pytest.mark.parametrize("argv", [["--sampler", "bogus"], ["--sampler", "Occupancy"], ["--sampler"],
                                  ["--sampler", "both", "--", "--sampler", "occupancy"]])
def test_a_bad_sampler_is_one_line_and_exit_status_2(argv, capsys):
    assert exit_status(bench.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--sampler" in err and "Traceback" not in err


def train_four_steps(demo_dir, tmp_path, sampler, *extra) -> Path:
    """A 4-step run of the tiny networks on the demo (the grid built after 2): its checkpoint."""
    assert run_nerf.main(["--config", str(bench.REPO / "configs" / "demo.txt"), "--datadir", str(demo_dir),
                          "--basedir", str(tmp_path), "--expname", "run", *bench.SMALL, *TINY_NETS, *extra,
                          "--sampler", sampler, "--occupancy_warmup", "2", "--N_iters", "4", "--i_weights", "4",
                          "--i_print", "1000000", "--i_img", "1000000", "--i_video", "1000000",
                          "--i_testset", "1000000"]) == 0
    return tmp_path / "run" / "000004.tar"


def test_grid_from_times_the_benchmarks_own_networks_through_another_runs_grid(demo_dir, tmp_path,  # noqa: F811
                                                                              capsys):
    """`--grid_from F`: the occupancy sampler marches through F's grid (its
    estimates and observations exactly), with networks of another size,
    drawn afresh and not trained; the default sampler is untouched. F without
    a grid, or with a grid of another resolution, is one line and exit 2."""
    occupancy_run = train_four_steps(demo_dir, tmp_path / "occupancy", "occupancy")
    ckpt = read_checkpoint(occupancy_run)
    _, _, (occ, hier), _ = bench_setup(demo_dir, "both", "--netwidth", "24", "--netwidth_fine", "24")
    fresh = {k: v.clone() for k, v in occ.kw_train["network_fine"].state_dict().items()}
    bench.take_grid([occ, hier], occupancy_run)
    assert hier.grid is None and occ.grid.ready
    for key in ("density", "observed"):
        assert torch.equal(occ.grid.density if key == "density" else occ.grid.observed,
                           ckpt[occupancy.CHECKPOINT_KEY][key])
    assert bench.ready_grid(occ, 3, torch.device("cpu"), None) == f"the grid saved in {occupancy_run}"
    assert occ.i == 0 and fresh["pts_linears.0.weight"].shape[0] == 24      # no step taken: the networks are fresh
    assert all(torch.equal(v, fresh[k]) for k, v in occ.kw_train["network_fine"].state_dict().items())
    # Steps and a timed update from the fresh networks leave the borrowed grid as it was learnt.
    binary = occ.grid.binary.clone()
    for _ in range(2):
        occ.step(torch.device("cpu"))
    occ.upkeep(torch.device("cpu"))
    assert len(occ.upkeep_times) == 1 and torch.equal(occ.grid.binary, binary)
    assert torch.equal(occ.grid.density, ckpt[occupancy.CHECKPOINT_KEY]["density"])
    occ.grid.update(occupancy.network_density(occ.kw_train))       # not vacuous: an update moves this grid
    assert not torch.equal(occ.grid.density, ckpt[occupancy.CHECKPOINT_KEY]["density"])
    default_run = train_four_steps(demo_dir, tmp_path / "default", "hierarchical")
    demo = ["--config", str(bench.REPO / "configs" / "demo.txt"), "--steps", "1", "--render_frames", "0"]
    for path, sampler, extra, problem in [(default_run, "both", [], f"{default_run}: holds no occupancy grid"),
                                          (occupancy_run, "both", ["--occupancy_resolution", "8"],
                                           f"{occupancy_run}: its occupancy grid does not fit"),
                                          (occupancy_run, "hierarchical", [], "--grid_from: only the occupancy")]:
        capsys.readouterr()
        status = exit_status(bench.main, [*demo, "--sampler", sampler, "--grid_from", str(path), "--",
                                          "--datadir", str(demo_dir), *TINY_NETS, *extra])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and problem in err, (status, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("trained_with", ["occupancy", "hierarchical"])
def test_a_checkpoint_is_timed_with_its_own_grid_or_one_built_from_its_networks(demo_dir, tmp_path,  # noqa: F811
                                                                                  trained_with):
    nets = ["--N_samples", "8", "--N_importance", "8"]
    path = train_four_steps(demo_dir, tmp_path, trained_with, *nets)
    args, scene, (occ, hier), _ = bench_setup(demo_dir, "both", *nets, "--ft_path", str(path))
    ckpt = read_checkpoint(path)
    for impl in (occ, hier):
        assert impl.i == 4
        for name in ("network_fn", "network_fine"):
            state = impl.kw_train[name].state_dict()
            assert all(torch.equal(state[k], ckpt[f"{name}_state_dict"][k]) for k in state)
    note = bench.ready_grid(occ, 3, torch.device("cpu"), path)
    assert occ.i == 4           # no warm-up steps: the checkpoint's networks are the ones timed
    if trained_with == "occupancy":
        assert note.startswith("the grid saved in")
        assert torch.equal(occ.grid.density, ckpt[occupancy.CHECKPOINT_KEY]["density"])
    else:                       # the grid a render of the checkpoint builds, from the same seed
        assert note.startswith(f"built from the networks of {path}")
        kw_train, kw_test, _, _, _ = run_nerf.create_nerf(args, torch.device("cpu"), ckpt, path, search=False)
        kw_train.update(near=scene.near, far=scene.far)
        kw_test.update(near=scene.near, far=scene.far)
        occupancy.attach(SimpleNamespace(**{**vars(args), "sampler": "occupancy"}), scene, kw_train, kw_test, ckpt,
                         path, torch.device("cpu"), rendering_only=True)
        assert torch.equal(occ.grid.density, kw_test["occupancy"].density)
