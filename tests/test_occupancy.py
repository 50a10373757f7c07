"""The opt-in occupancy-grid sampler (`--sampler occupancy`, nerf/occupancy.py)
and the default it must leave alone (`--sampler hierarchical`, the original's)."""
import json
import logging
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import run_nerf
from nerf import occupancy, rendering
from test_cli import QUIET, TINY
from host_syncs import count_training
from test_demo_run import demo_args, demo_dir  # noqa: F401 (fixture)
from test_host_syncs import STEADY, sync_args
from test_resume import assert_resume_is_exact

# The default path after 3 steps of the demo (seed 4: a network born alive; lrate 5e-3 so that 3 steps
# move the pixels), recorded before the occupancy sampler existed: per parameter tensor its float64 sum
# and L2 norm, and the mean and mean square of the 3 test views' 8-bit pixels.
PINNED = {
    "network_fn.pts_linears.0.weight": (7.236086230375804, 3.225230623232283),
    "network_fn.pts_linears.0.bias": (1.2721320101991296, 0.6894892807169574),
    "network_fn.pts_linears.1.weight": (-0.608229331439361, 3.249175891722873),
    "network_fn.pts_linears.1.bias": (-0.02813588222488761, 0.5823820193339387),
    "network_fn.views_linears.0.weight": (0.6098321999888867, 2.308648206722605),
    "network_fn.views_linears.0.bias": (-0.4151598960161209, 0.3352258914826476),
    "network_fn.feature_linear.weight": (-0.8437949132930953, 3.236002275249797),
    "network_fn.feature_linear.bias": (-0.3543681646697223, 0.6108501717225719),
    "network_fn.alpha_linear.weight": (0.5812587328255177, 0.5038147175789817),
    "network_fn.alpha_linear.bias": (0.007775044068694115, 0.007775044068694115),
    "network_fn.rgb_linear.weight": (1.5012526167556643, 1.0522142072093328),
    "network_fn.rgb_linear.bias": (0.3047192096710205, 0.34166947214398924),
    "network_fine.pts_linears.0.weight": (4.039255924988538, 3.3427138786908697),
    "network_fine.pts_linears.0.bias": (-0.1137780831195414, 0.598363714679404),
    "network_fine.pts_linears.1.weight": (-5.268078163149767, 3.3488363884974905),
    "network_fine.pts_linears.1.bias": (-0.4295850652270019, 0.4915297138404451),
    "network_fine.views_linears.0.weight": (-0.5258008641249035, 2.321707173631914),
    "network_fine.views_linears.0.bias": (-0.7762919077649713, 0.34428823832122935),
    "network_fine.feature_linear.weight": (2.7499862792901695, 3.2970270624007414),
    "network_fine.feature_linear.bias": (0.10634505050256848, 0.5330938668491001),
    "network_fine.alpha_linear.weight": (0.0653097708709538, 0.4984810608280648),
    "network_fine.alpha_linear.bias": (0.1162382960319519, 0.1162382960319519),
    "network_fine.rgb_linear.weight": (0.2194469664245844, 0.9465617450490051),
    "network_fine.rgb_linear.bias": (0.20265833288431168, 0.31498298633123506),
    "pixels": (215.6381172839506, 49110.541666666664),
}
# Measured: reruns on this machine agree to the last bit. Another CPU's kernels may order float32 sums
# differently (~1e-7 relative per operation, amplified by 3 Adam steps to ~1e-5 at most); a change of the
# formulas moves these figures by 1e-3 or more. rel 1e-4 lies between the two.
PIN_RTOL = 1e-4


def pin_run(demo_dir: Path, basedir: Path, *extra: str) -> Path:  # noqa: F811
    argv = ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(basedir), "--expname", "pin",
            "--white_bkgd", "--testskip", "1", "--seed", "4", "--lrate", "5e-3", *TINY, *QUIET,
            "--N_iters", "3", "--i_weights", "3", "--i_testset", "3", *extra]
    assert run_nerf.main(argv) == 0
    return basedir / "pin"


def pin_figures(expdir: Path) -> dict:
    ckpt = torch.load(expdir / "000003.tar", weights_only=True)
    out = {}
    for net in ("network_fn", "network_fine"):
        for k, v in ckpt[f"{net}_state_dict"].items():
            out[f"{net}.{k}"] = (float(v.double().sum()), float(v.double().norm()))
    px = np.stack([imageio.imread(expdir / "testset_000003" / f"{k:03d}.png") for k in range(3)]).astype(np.float64)
    out["pixels"] = (float(px.mean()), float((px ** 2).mean()))
    return out


def checkpoint_weights(expdir: Path) -> dict:
    ckpt = torch.load(expdir / "000003.tar", weights_only=True)
    return {f"{net}.{k}": v for net in ("network_fn", "network_fine") for k, v in ckpt[f"{net}_state_dict"].items()}


def test_the_default_path_is_pinned_and_sampler_hierarchical_is_the_default(demo_dir, tmp_path):  # noqa: F811
    default = pin_run(demo_dir, tmp_path / "default")
    figures = pin_figures(default)
    assert figures.keys() == PINNED.keys()
    for key, (total, norm) in PINNED.items():
        assert figures[key] == pytest.approx((total, norm), rel=PIN_RTOL, abs=1e-6), key
    explicit = pin_run(demo_dir, tmp_path / "explicit", "--sampler", "hierarchical")
    a, b = checkpoint_weights(default), checkpoint_weights(explicit)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in range(3):
        name = f"testset_000003/{k:03d}.png"
        assert np.array_equal(imageio.imread(default / name), imageio.imread(explicit / name)), name


# --- packed compositing ------------------------------------------------------

def dense_twin_of_packed(counts, seed: int, white_bkgd: bool):
    """Rays with `counts` samples each, as the dense renderer sees them (padded
    to the longest with zero-density samples, which change no weight) and as
    packed samples whose intervals are the dense ones' (z_{i+1} - z_i) |d|."""
    g = torch.Generator().manual_seed(seed)
    N, S = len(counts), max(counts) + 1
    raw = torch.randn(N, S, 4, generator=g, dtype=torch.float64) * 3
    z = torch.cumsum(torch.rand(N, S, generator=g, dtype=torch.float64) + 0.05, -1)
    rays_d = torch.randn(N, 3, generator=g, dtype=torch.float64)
    real = torch.arange(S)[None] < torch.tensor(counts)[:, None]
    raw[..., 3] = torch.where(real, raw[..., 3], torch.full_like(raw[..., 3], -1.0))     # relu: zero density
    delta = torch.cat([z[:, 1:] - z[:, :-1], torch.full_like(z[:, :1], 1e10)], -1) * rays_d.norm(dim=-1)[:, None]
    ray, k = real.nonzero(as_tuple=True)
    return raw, z, rays_d, (raw[ray, k], z[ray, k], delta[ray, k], ray)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("white_bkgd", [False, True])
def test_packed_compositing_equals_dense_compositing_in_float64(seed, white_bkgd):
    counts = [0, 1, 2, 7, 3, 0, 5, 1][: 5 + seed]
    raw, z, rays_d, (p_raw, p_t, p_delta, p_ray) = dense_twin_of_packed(counts, seed, white_bkgd)
    rgb, disp, acc, weights, _ = rendering.raw2outputs(raw, z, rays_d, white_bkgd=white_bkgd)
    packed = rendering.composite_packed(p_raw, p_t, p_delta, p_ray, len(counts), white_bkgd=white_bkgd,
                                        median_depth=True)
    # float64 throughout: the two forms of prod (1 - alpha + 1e-10) differ by rounding alone
    # (measured: 2e-14 relative at most).
    for key, want in (("rgb_map", rgb), ("disp_map", disp), ("acc_map", acc)):
        assert torch.allclose(packed[key], want, rtol=1e-10, atol=1e-12), key
    has = torch.tensor(counts) > 0
    want_median = rendering.median_termination(weights, z)
    assert torch.allclose(packed["t_median"][has], want_median[has], rtol=1e-10, atol=1e-12)


def test_packed_compositing_by_hand():
    """One ray, two samples: sigma 1 and 2 over intervals of 0.5 (relu), colours from logits 0 and ln 3."""
    raw = torch.tensor([[0.0, 0.0, 0.0, 1.0], [math.log(3), math.log(3), math.log(3), 2.0]], dtype=torch.float64)
    t = torch.tensor([1.0, 1.5], dtype=torch.float64)
    out = rendering.composite_packed(raw, t, torch.full_like(t, 0.5), torch.tensor([0, 0]), 1)
    a1, a2 = 1 - math.exp(-0.5), 1 - math.exp(-1.0)
    w1, w2 = a1, a2 * (1 - a1 + 1e-10)
    assert out["acc_map"].item() == pytest.approx(w1 + w2, rel=1e-14)
    assert out["rgb_map"][0, 0].item() == pytest.approx(0.5 * w1 + 0.75 * w2, rel=1e-14)
    assert out["disp_map"].item() == pytest.approx((w1 + w2) / (1.0 * w1 + 1.5 * w2), rel=1e-14)


# --- the grid and the marching -----------------------------------------------

def gaussian_blobs(seed: int, n: int = 3):
    """An analytic density field (K, 3) -> (K,): n Gaussian blobs of random
    centres, widths 0.1-0.25 and peaks 10-1000 inside [-1, 1]^3."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 3, generator=g) * 1.2 - 0.6
    widths = 0.1 + 0.15 * torch.rand(n, generator=g)
    peaks = 10 ** (1 + 2 * torch.rand(n, generator=g))

    def density(pts):
        return (peaks * torch.exp(-((pts[:, None] - centres) ** 2).sum(-1) / (2 * widths ** 2))).sum(-1)
    return density


def cube_grid(resolution: int, seed: int = 0, n_steps: int = 256) -> occupancy.OccupancyGrid:
    R = resolution
    return occupancy.OccupancyGrid(-torch.ones(3), torch.ones(3), R, torch.ones(R ** 3, dtype=torch.bool), n_steps,
                                   seed, cells_per_update=4096, warmup=0, interval=1)


def rays_at_the_box(seed: int, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, 3, generator=g)
    o = 3 * o / o.norm(dim=-1, keepdim=True)
    d = (torch.rand(n, 3, generator=g) * 1.6 - 0.8 - o) * (0.5 + torch.rand(n, 1, generator=g))
    return o, d, torch.zeros(n, 1), torch.full((n, 1), 10.0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("resolution, n_steps", [(16, 256), (40, 256), (16, 40), (40, 1024), (64, 16)])
def test_skipping_never_drops_a_sample_where_the_density_is_above_the_threshold(seed, resolution, n_steps):
    """Every step of the marching lattice (recomputed here in float64) whose
    analytic density exceeds the grid's threshold is marched, early termination
    switched off; and most of the lattice is skipped. The sizes sweep the
    two-level march's segments from 1 step (64^3 cells, 16 steps: a step
    longer than 2 cells, the grid widened by 4 cells) to 18."""
    density = gaussian_blobs(seed)
    grid = cube_grid(resolution, seed, n_steps)
    grid.build(density)
    grid.termination = 0.0
    o, d, near, far = rays_at_the_box(100 + seed)
    ray, t, _ = grid.march(o, d, near, far, perturb=False)
    o, d = o.double(), d.double()
    t_lo, t_hi = (-1 - o) / d, (1 - o) / d
    t0 = torch.minimum(t_lo, t_hi).max(-1).values.clamp(min=0)
    t1 = torch.maximum(t_lo, t_hi).min(-1).values
    dt = grid.step_size / d.norm(dim=-1)
    lattice = t0[:, None] + (torch.arange(grid.n_steps + 1, dtype=torch.float64) + 0.5) * dt[:, None]
    sigma = density((o[:, None] + d[:, None] * lattice[..., None]).reshape(-1, 3).float()).reshape(lattice.shape)
    # Lattice points within 1e-4 steps of the exit may fall either side of it in float32.
    must = (sigma > grid.threshold) & (lattice < t1[:, None] - 1e-4 * dt[:, None])
    marched = torch.zeros_like(must)
    marched[ray, torch.round((t.double() - t0[ray]) / dt[ray] - 0.5).long()] = True
    assert must.sum() > 200                                   # not vacuous: measured 717 to 33016
    assert not (must & ~marched).any(), int((must & ~marched).sum())
    assert marched.sum() < 0.75 * (lattice < t1[:, None]).sum()      # measured: 0.29 to 0.60 of it


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("resolution, n_steps", [(16, 256), (40, 256), (16, 40), (40, 1024), (64, 16)])
@pytest.mark.parametrize("budget", [None, 4, 64])
def test_the_compact_march_of_rendering_takes_the_same_samples(seed, resolution, n_steps, budget):
    """`march(compact=True)` (rendering: only the rays with a candidate
    segment, only as many slots as the longest needs) gives the samples of
    the plain march bit for bit, jittered or not, with or without a budget
    (4: every ray with samples over it), on rays that partly miss the scene."""
    density = gaussian_blobs(seed)
    grid = cube_grid(resolution, seed, n_steps)
    grid.build(density)
    o, d, near, far = rays_at_the_box(200 + seed, n=400)
    o, d = torch.cat([o, o]), torch.cat([d, -d])                  # half of them turn away from the box
    near, far = torch.cat([near, near]), torch.cat([far, far])
    for perturb in (False, True):
        marches = []
        for compact in (False, True):
            torch.manual_seed(seed)
            marches.append(grid.march(o, d, near, far, perturb, budget, compact=compact))
        (ray, t, delta), (ray_c, t_c, delta_c) = marches
        assert len(ray) > 100 and ray.max() < 400                  # not vacuous; the rays past the box take none
        assert torch.equal(ray, ray_c) and torch.equal(t, t_c) and torch.equal(delta, delta_c)


def test_early_termination_keeps_the_picture():
    """A dense ball: stopping where the grid's transmittance falls below 1e-4
    drops samples (measured: 39 %) and changes no pixel by more than 1e-5 (measured: 0, the dropped samples'
    weights lie below float32's resolution)."""
    def ball(pts):
        return torch.where(pts.norm(dim=-1) < 0.5, torch.full_like(pts[:, 0], 200.0), torch.zeros_like(pts[:, 0]))

    grid = cube_grid(32)
    grid.build(ball)
    o, d, near, far = rays_at_the_box(7)
    colours = {}
    for termination in (0.0, occupancy.TERMINATION):
        grid.termination = termination
        ray, t, _ = grid.march(o, d, near, far, perturb=False)
        pts = o[ray] + d[ray] * t[:, None]
        raw = torch.cat([pts, ball(pts)[:, None]], -1)
        out = rendering.composite_packed(raw, t, torch.full_like(t, grid.step_size), ray, len(o))
        colours[termination] = (out["rgb_map"], out["acc_map"], len(t))
    (rgb_all, acc_all, n_all), (rgb, acc, n) = colours[0.0], colours[occupancy.TERMINATION]
    # With a budget, a ray within it is marched exactly as with no budget (the two-level march looks at
    # every step of its candidate segments: the ball and its margins span under 4 x 64 steps).
    ray_b, t_b, delta_b = grid.march(o, d, near, far, perturb=False, max_per_ray=64)
    ray, t, delta = grid.march(o, d, near, far, perturb=False)
    within = torch.bincount(ray, minlength=len(o)) <= 64
    assert within.sum() > 150 and (torch.bincount(ray_b, minlength=len(o)) <= 64).all()
    assert torch.equal(t_b[within[ray_b]], t[within[ray]]) and torch.equal(delta_b[within[ray_b]], delta[within[ray]])
    assert (acc_all > 0.99).sum() > 20 and n < 0.75 * n_all      # measured: 0.61
    assert (rgb - rgb_all).abs().max() < 1e-5 and (acc - acc_all).abs().max() < 1e-5


@pytest.mark.parametrize("resolution", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("seed", range(2))
def test_neighbourhood_max_is_the_3x3x3_window_cut_at_the_border(resolution, seed):
    """Against a direct float64 loop over each cell's window, on values with
    ties, negatives and -inf (the erosion of `opaque` passes negated densities)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, (resolution ** 3,), generator=g).float()
    values[torch.rand(resolution ** 3, generator=g) < 0.1] = -math.inf
    got = occupancy.neighbourhood_max(values, resolution).reshape((resolution,) * 3)
    v = values.double().reshape((resolution,) * 3)
    for i, j, k in np.ndindex(*(resolution,) * 3):
        window = v[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2]
        assert got[i, j, k].item() == window.max().item()
    assert occupancy.neighbourhood_max(values.to(torch.uint8).clamp(0, 1), resolution).dtype == torch.uint8


@pytest.mark.parametrize("resolution", [1, 5, 128])
def test_ray_cells_are_the_cells_of_the_points_in_float64(resolution):
    """Each marched point's cell, from floor((p - lo) / (hi - lo) R) in float64,
    clamped to the box: equal except for points within 1e-4 of a cell's face
    (float32 puts those either side; measured: none of 40000 here)."""
    g = torch.Generator().manual_seed(resolution)
    lo, hi = torch.tensor([-1.5, -0.5, 2.0]), torch.tensor([1.0, 2.5, 3.0])
    o = torch.rand(200, 3, generator=g) * 6 - 3
    d = torch.randn(200, 3, generator=g)
    t = torch.rand(200, 200, generator=g) * 4
    scale = resolution / (hi - lo)
    cells = occupancy.ray_cells((o - lo) * scale, d * scale, t, resolution)
    pts = o.double()[:, None] + d.double()[:, None] * t.double()[..., None]
    u = (pts - lo.double()) / (hi - lo).double() * resolution
    ijk = u.floor().long().clamp(0, resolution - 1)
    expected = (ijk[..., 0] * resolution + ijk[..., 1]) * resolution + ijk[..., 2]
    near_face = ((u - u.round()).abs() < 1e-4).any(-1)
    assert near_face.float().mean() < 0.01
    assert torch.equal(cells[~near_face], expected[~near_face])


def test_grid_updates_are_deterministic_for_a_seed():
    density = gaussian_blobs(0)
    grids = [cube_grid(16, seed) for seed in (0, 0, 1)]
    for grid in grids:
        grid.build(density)
        for _ in range(3):
            grid.update(lambda pts: 0.5 * density(pts))
    assert torch.equal(grids[0].density, grids[1].density) and torch.equal(grids[0].binary, grids[1].binary)
    assert not torch.equal(grids[0].density, grids[2].density)


@pytest.mark.parametrize("seed", range(6))
def test_the_grid_forgets_a_fog_the_network_has_lost_and_keeps_every_dense_cell(seed):
    """A grid built from blobs under a fog of density 10, then updated from the
    blobs alone, re-estimating 1/64 of the cells an update (the default's share
    at 128^3): within twice the updates the decay needs to bring the fog below
    the threshold, no cell whose neighbourhood the blobs leave empty is
    occupied, and no cell the blobs make dense throughout (5^3 points) is ever
    empty on the way. Decaying only the re-estimated cells left most of the fog."""
    R = 32
    blobs = gaussian_blobs(seed)
    grid = occupancy.OccupancyGrid(-torch.ones(3), torch.ones(3), R, torch.ones(R ** 3, dtype=torch.bool), 256,
                                   seed, cells_per_update=R ** 3 // 64, warmup=0, interval=1)
    grid.build(lambda pts: blobs(pts) + 10.0)
    u = torch.linspace(0, 1, 5)
    lattice = torch.stack(torch.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    cells = torch.arange(R ** 3)
    values = torch.stack([blobs(occupancy.cell_centres(grid.lo, grid.hi, R, cells, j.expand(R ** 3, 3)))
                          for j in lattice])
    dense = values.min(0).values > grid.threshold
    empty = occupancy.neighbourhood_max(values.max(0).values, R) < 1e-3
    assert dense.sum() > 1000 and empty.sum() > 1000
    updates = 2 * math.ceil(math.log(grid.threshold / 10.0) / math.log(occupancy.EMA_DECAY))
    for _ in range(updates):
        grid.update(blobs)
        assert not (dense & ~grid.binary).any()
    assert not (empty & grid.binary).any()


@pytest.mark.parametrize("seed", range(3))
def test_the_training_samples_densities_replace_the_estimates_of_the_cells_they_cross(seed):
    """Rays marched through a grid built under a fog of 10 find the blobs alone:
    at the next update every cell a sample lies in holds the largest density
    found in it (here the re-estimates find nothing, so they change no
    estimate), every other cell its estimate decayed once, and the
    observations are spent. The cells are recomputed in float64 (points within
    1e-4 of a cell face left out)."""
    R = 16
    blobs = gaussian_blobs(seed)
    grid = cube_grid(R, seed)
    grid.build(lambda pts: blobs(pts) + 10.0)
    before = grid.density.clone()
    o, d, near, far = rays_at_the_box(300 + seed)
    ray, t, _ = grid.march(o, d, near, far, perturb=True)
    pts = o[ray] + d[ray] * t[:, None]
    sigma = blobs(pts)
    grid.observe(pts, sigma)
    grid.update(lambda p: torch.zeros(p.shape[0]))
    u = (pts.double() + 1) / 2 * R
    cells = (u.floor().long().clamp(0, R - 1) * torch.tensor([R * R, R, 1])).sum(-1)
    near_face = ((u - u.round()).abs() < 1e-4).any(-1)
    assert near_face.float().mean() < 0.01
    found = torch.full((R ** 3,), -1.0).scatter_reduce(0, cells, sigma, "amax")
    crossed = found >= 0
    doubtful = torch.zeros_like(crossed)               # either cell of a point near a face
    doubtful[cells[near_face]] = True
    doubtful[occupancy.point_cells(pts[near_face], grid.lo, grid.hi, R)] = True
    clean, untouched = crossed & ~doubtful, ~crossed & ~doubtful
    assert clean.sum() > 300 and (found[clean] < 1.0).sum() > 100     # not vacuous: the fog is gone there
    assert torch.equal(grid.density[clean], found[clean])
    assert torch.equal(grid.density[untouched], before[untouched] * occupancy.EMA_DECAY)
    assert bool((grid.observed == -1).all())


@pytest.mark.parametrize("resolution", [1, 5, 16, 128])
def test_point_cells_are_the_cells_of_the_points_in_float64(resolution):
    g = torch.Generator().manual_seed(resolution)
    lo, hi = torch.tensor([-1.5, -0.5, 0.2]), torch.tensor([2.0, 0.5, 3.1])
    pts = lo + (hi - lo) * (torch.rand(20000, 3, generator=g) * 1.2 - 0.1)     # some outside the box
    u = (pts.double() - lo.double()) / (hi - lo).double() * resolution
    ijk = u.floor().long().clamp(0, resolution - 1)
    expected = (ijk[:, 0] * resolution + ijk[:, 1]) * resolution + ijk[:, 2]
    near_face = ((u - u.round()).abs() < 1e-4).any(-1)
    got = occupancy.point_cells(pts, lo, hi, resolution)
    assert near_face.float().mean() < 0.01 or resolution == 1
    assert torch.equal(got[~near_face], expected[~near_face])


# --- training, checkpoints, flags ---------------------------------------------

OCCUPANCY = ["--sampler", "occupancy", "--occupancy_resolution", "16", "--occupancy_warmup", "2",
             "--occupancy_interval", "2", "--occupancy_cells", "512", "--occupancy_steps", "128"]


def test_resume_with_the_occupancy_sampler_is_exact(demo_dir, tmp_path):  # noqa: F811
    """Straight through 8 steps, or 4 then 4: the warm-up ends at step 2, updates at 4, 6, 8."""
    assert_resume_is_exact(["--dataset_type", "demo", "--datadir", str(demo_dir), "--white_bkgd", "--seed", "4",
                            *OCCUPANCY], tmp_path, n=4)
    grids = [torch.load(tmp_path / name / "000008.tar", weights_only=True) for name in ("straight", "resumed")]
    assert all(g["sampler"] == "occupancy" and g["occupancy_grid"]["ready"] for g in grids)
    assert torch.equal(grids[0]["occupancy_grid"]["density"], grids[1]["occupancy_grid"]["density"])
    assert torch.equal(grids[0]["occupancy_grid"]["observed"], grids[1]["occupancy_grid"]["observed"])
    assert (grids[0]["occupancy_grid"]["observed"] >= 0).sum() > 10        # step 8's samples, pending
    assert torch.equal(grids[0]["occupancy_grid"]["generator"], grids[1]["occupancy_grid"]["generator"])


def test_the_occupancy_step_synchronises_with_the_host_at_most_once(demo_dir, tmp_path):  # noqa: F811
    status, found = count_training(sync_args(demo_dir, tmp_path, *OCCUPANCY))
    assert status == 0
    marching = [i for i in STEADY if i > 3]
    assert all(len(found.get(i, [])) <= 1 for i in marching), {i: found.get(i) for i in marching}
    assert all(found.get(i) == [found[marching[0]][0]] for i in marching), "one count, the marching's, each step"
    assert found[marching[0]][0].startswith("nonzero at occupancy.py")


@pytest.mark.parametrize("flags, where", [
    (["--occupancy_box", "0 0 0 1 1 1"], "--occupancy_box"),
    (["--sampler", "occupancy", "--lindisp"], "--lindisp"),
    (["--sampler", "occupancy", "--occupancy_box", "0 0 0 1 1"], "--occupancy_box"),
    (["--sampler", "occupancy", "--occupancy_box", "0 0 0 1 -1 1"], "--occupancy_box"),
    (["--sampler", "occupancy", "--occupancy_box", "a b c d e f"], "--occupancy_box"),
    (["--sampler", "occupancy", "--occupancy_resolution", "0"], "--occupancy_resolution"),
    (["--sampler", "occupancy", "--occupancy_resolution", "513"], "--occupancy_resolution"),
    (["--sampler", "occupancy", "--occupancy_steps", "0"], "--occupancy_steps"),
    (["--sampler", "occupancy", "--occupancy_warmup", "-1"], "--occupancy_warmup"),
    (["--sampler", "nerfacc"], "--sampler"),
])
def test_a_combination_the_sampler_cannot_honour_is_one_line(flags, where, demo_dir, tmp_path, capsys):  # noqa: F811
    argv = ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(tmp_path), "--expname", "x", *flags]
    assert run_nerf.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {where}"), err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_network_trained_with_either_sampler_renders_with_either(demo_dir, tmp_path):  # noqa: F811
    """Trained with one, rendered with the other (a grid built from the network
    when the checkpoint has none): the test views' PSNR within 1 dB of the
    renders with the sampler it was trained with."""
    common = ["--dataset_type", "demo", "--datadir", str(demo_dir), "--basedir", str(tmp_path), "--white_bkgd",
              "--testskip", "1", "--seed", "4", "--lrate", "5e-3", *TINY, *QUIET, "--N_iters", "30",
              "--i_weights", "30", *OCCUPANCY[2:]]
    for trained in ("hierarchical", "occupancy"):
        assert run_nerf.main([*common, "--expname", trained, "--sampler", trained]) == 0
        psnrs = {}
        for rendered in ("hierarchical", "occupancy"):
            assert run_nerf.main([*common, "--expname", trained, "--sampler", rendered, "--render_only",
                                  "--render_test"]) == 0
            folders = sorted((tmp_path / trained).glob("renderonly_test_000030*"))
            psnrs[rendered] = json.loads((folders[-1] / "metrics.json").read_text())["mean"]["psnr"]
            assert len(list((folders[-1] / "depth").glob("*.npy"))) == 3
        assert abs(psnrs["hierarchical"] - psnrs["occupancy"]) < 1.0, (trained, psnrs)


@pytest.mark.parametrize("perturb", [False, True])
def test_a_ray_never_takes_more_samples_than_its_budget(perturb):
    """A grid that has learnt nothing (every cell occupied, nothing opaque): a
    ray with n > budget steps keeps at most `budget` of them, evenly spaced
    (every s-th step, each standing for s steps), so that the lengths they
    stand for add up to the ray's marched span n step_size, up to two
    strides; with no budget every step is kept."""
    grid = cube_grid(8, n_steps=128)
    grid.ready = True
    o, d, near, far = rays_at_the_box(3, n=50)
    torch.manual_seed(0)
    ray_all, t_all, delta_all = grid.march(o, d, near, far, perturb=False)
    counts_all = torch.zeros(50, dtype=torch.long).index_add_(0, ray_all, torch.ones_like(ray_all))
    assert (counts_all > 40).sum() > 20 and torch.all(delta_all == grid.step_size)
    dt = grid.step_size / d.norm(dim=-1)
    for budget in (1, 5, 40, 500):
        ray, t, delta = grid.march(o, d, near, far, perturb=perturb, max_per_ray=budget)
        counts = torch.zeros(50, dtype=torch.long).index_add_(0, ray, torch.ones_like(ray))
        assert (counts <= budget).all() and torch.equal(counts > 0, counts_all > 0)
        for r in torch.nonzero(counts_all).flatten().tolist():
            share, steps = delta[ray == r] / grid.step_size, (t[ray == r] - t_all[ray_all == r][0]) / dt[r]
            assert torch.allclose(share, share[0]) and share[0] >= 1
            if len(steps) > 1:              # evenly spaced, whole steps apart (+ the jitter), the span covered
                spacing = steps[1] - steps[0]
                assert torch.allclose(steps.diff(), spacing, atol=1e-3) and abs(spacing - spacing.round()) < 1e-3
                assert abs(float(share.sum()) - counts_all[r]) < spacing + 1e-3, (budget, r)
            if budget >= 4 * counts_all[r] and not perturb:
                assert torch.equal(t[ray == r], t_all[ray_all == r])


@pytest.mark.parametrize("N_samples", [1, 3, 8, 17])
@pytest.mark.parametrize("state", ["fog", "blobs"])
def test_the_sampler_gives_a_ray_at_most_N_samples_samples_whatever_N_importance(N_samples, state):
    """`render_rays`' budget is N_samples, the default's coarse pass, not
    N_samples + N_importance: the network is queried once, at the samples
    of `march(max_per_ray=N_samples)`, and no ray gets more. Through a grid
    full of fog (every cell occupied, nothing opaque) every ray that meets
    the box has far more steps, so it is thinned to more than half of the
    budget (ceil(c / ceil(c / B)) > B / 2 for c >= B steps)."""
    grid = cube_grid(16, n_steps=256)
    if state == "blobs":
        grid.build(gaussian_blobs(1))
    else:
        grid.ready = True
    o, d, near, far = rays_at_the_box(5, n=100)
    queried = []

    def query(pts, viewdirs, network):
        queried.append(pts.shape)
        return torch.cat([torch.zeros(pts.shape[0], 1, 3), torch.full((pts.shape[0], 1, 1), 5.0)], -1)

    with torch.no_grad():
        out = grid.render_rays(torch.cat([o, d, near, far], -1), network_fn=None, network_query_fn=query,
                               N_samples=N_samples, N_importance=64, perturb=0.0)
    ray = grid.march(o, d, near, far, False, N_samples, compact=True)[0]
    counts = torch.bincount(ray, minlength=len(o))
    assert queried == [torch.Size([len(ray), 1, 3])] and out["rgb_map"].shape == (len(o), 3)
    assert counts.max() == N_samples or (state == "blobs" and 0 < counts.max() < N_samples)
    if state == "fog":
        met = counts > 0
        assert met.sum() > 50 and (2 * counts[met] > N_samples).all()


def test_a_grid_that_emptied_falls_back_to_every_visible_cell():
    """A network whose densities all fell to zero empties the grid: marching
    then takes every visible cell again, so that gradients reach the network
    (and the collapse guard can see and restart it), rather than no sample at all."""
    grid = cube_grid(8)
    visible = torch.zeros(8 ** 3, dtype=torch.bool)
    visible[: 8 ** 3 // 2] = True
    grid.visible = visible
    grid.build(lambda pts: torch.zeros(pts.shape[0]))
    assert torch.equal(grid.binary, visible)
    grid.update(lambda pts: torch.where(pts[:, 0] < -0.5, torch.full_like(pts[:, 0], 50.0),
                                        torch.zeros_like(pts[:, 0])))
    assert grid.binary.sum() < visible.sum() and not (grid.binary & ~visible).any()


@pytest.mark.parametrize("resolution, coarse", [(24, 6), (25, 7), (16, 16)])
def test_visibility_on_the_coarse_lattice_never_hides_a_cell_a_camera_sees(resolution, coarse):
    """Narrow cameras inside a large box: every cell whose ball some camera sees
    (tested cell by cell) is visible, and some cells are not."""
    g = torch.Generator().manual_seed(resolution)
    poses = []
    for _ in range(6):
        z = torch.randn(3, generator=g)
        z = z / z.norm()
        right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), z)
        right = right / right.norm()
        poses.append(torch.stack([right, torch.linalg.cross(z, right), z, 3 * z], 1))
    poses = torch.stack(poses)
    K = np.array([[150.0, 0, 50], [0, 150.0, 50], [0, 0, 1]])
    lo, hi = -3 * torch.ones(3), 3 * torch.ones(3)
    got = occupancy.visible_cells(lo, hi, resolution, poses, K, 100, 100, 2.0, 4.0, coarse=coarse)
    exact = occupancy.seen_by_cameras(occupancy.cell_centres(lo, hi, resolution), poses, K, 100, 100, 2.0, 4.0,
                                      float((hi - lo).norm()) / resolution / 2) > 0
    assert exact.any() and not got.all()
    assert not (exact & ~got).any()


@pytest.mark.slow
def test_two_processes_march_the_grid_of_one(demo_dir, tmp_path):  # noqa: F811
    """torchrun with two gloo processes against one process, through the warm-up
    (2 steps), the grid's build and three updates: every rank holds the same
    grid, so the weights are those of one process within the all-reduce's rounding."""
    from test_distributed import EXACT, assert_close_weights, one_process, torchrun
    argv = demo_args(demo_dir, tmp_path, *EXACT, *OCCUPANCY, "--N_iters", "8", "--i_weights", "8")
    assert one_process([*argv, "--expname", "one"]) == 0
    two = torchrun([*argv, "--expname", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close_weights(tmp_path / "one" / "000008.tar", tmp_path / "two" / "000008.tar")
    grids = [torch.load(tmp_path / name / "000008.tar", weights_only=True)["occupancy_grid"] for name in ("one", "two")]
    # The grids' estimates differ by the weights' rounding (measured: 3e-8 on estimates up to 0.31).
    assert grids[0]["ready"] and torch.allclose(grids[0]["density"], grids[1]["density"], rtol=0, atol=1e-6)


def test_the_two_network_variant_is_the_default_sampler_where_every_cell_is_occupied():
    """benchmarks/samplers.py --two_networks: coarse + fine sampling between a
    ray's first and last candidate segment. With every cell occupied and rays
    inside the box from near to far, that span is near..far, so its maps are
    `render_rays`' own, bit for bit; with the grid empty but for a slab, the
    samples all lie in the slab's candidate segments."""
    from benchmarks.samplers import two_networks_in_the_grid
    grid = cube_grid(8, n_steps=128)
    grid.ready = True
    g = torch.Generator().manual_seed(0)
    o, d = torch.rand(64, 3, generator=g) * 0.4 - 0.2, torch.randn(64, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    batch = torch.cat([o, d, torch.full((64, 1), 0.1), torch.full((64, 1), 0.6)], -1)

    def network(inputs):        # its raw colour is the point itself: where the samples were taken
        return torch.cat([inputs, 5 * torch.cos(2 * inputs[..., :1]) + 5], -1)

    def query(inputs, viewdirs, fn):
        return fn(inputs)

    kwargs = dict(network_fn=network, network_query_fn=query, N_samples=8, N_importance=8, network_fine=network,
                  perturb=0.0, retraw=True)
    ours, theirs = two_networks_in_the_grid(grid, batch, **kwargs), rendering.render_rays(batch, **kwargs)
    for key in ("rgb_map", "disp_map", "acc_map", "rgb0", "raw"):
        assert torch.equal(ours[key], theirs[key]), key
    slab = occupancy.cell_centres(grid.lo, grid.hi, 8)[:, 0].abs() < 0.25     # the cells with |x| < 0.25
    grid.set_binary(slab, torch.zeros_like(grid.density))
    batch[:, 3:6] = torch.tensor([1.0, 0.0, 0.0]) + 0.2 * torch.randn(64, 3, generator=g)   # rays across the slab
    batch[:, 3:6] /= batch[:, 3:6].norm(dim=-1, keepdim=True)
    batch[:, 7] = 0.95
    x = two_networks_in_the_grid(grid, batch, **kwargs)["raw"][..., 0]          # (64, 16) the fine samples' x
    x_default = rendering.render_rays(batch, **kwargs)["raw"][..., 0]
    o, d = batch[:, :3], batch[:, 3:6]
    hit = grid.candidate_segments(o, d, *grid.box_span(o, d, batch[:, 6:7], batch[:, 7:8])).any(-1)
    # A candidate segment's middle lies in the slab widened by a cell (0.25), its ends at most a cell further;
    # a ray with no candidate segment keeps near and far.
    assert hit.sum() > 30 and (x[hit].abs() <= 0.25 + 0.25 + 0.25 + 1e-4).all()
    assert (x_default[hit].abs() > 0.8).sum() > 50 and torch.equal(x[~hit], x_default[~hit])


def damaged_grids(state: dict):
    """A checkpoint's grid entry damaged in each way a file can be: (name, entry)."""
    C = state["density"].shape[0]
    yield "not a dict", [1, 2, 3]
    for key in ("lo", "hi", "density", "ready", "generator"):
        yield f"no {key}", {k: v for k, v in state.items() if k != key}
    for name, density in (("short", state["density"][:-1]), ("2-d", state["density"].reshape(1, C)),
                          ("integers", torch.ones(C, dtype=torch.long)), ("NaN", torch.full((C,), math.nan)),
                          ("negative", -torch.ones(C)), ("a string", "dense")):
        yield f"density {name}", {**state, "density": density}
    yield "lo a string", {**state, "lo": "low"}
    yield "hi of 2", {**state, "hi": torch.ones(2)}
    yield "ready a tensor of 2", {**state, "ready": torch.ones(2)}
    for name, observed in (("short", state["observed"][:-1]), ("NaN", torch.full((C,), math.nan)),
                           ("below -1", torch.full((C,), -2.0))):
        yield f"observed {name}", {**state, "observed": observed}


def test_a_damaged_grid_in_a_checkpoint_is_one_line_and_built_anew(caplog):
    """The grid is derived from the networks: a damaged one is said in one
    line and the grid is left to be built again (not ready, nothing read
    from it), never a traceback; a sound one (the control) is taken."""
    source = cube_grid(8)
    source.build(gaussian_blobs(0))
    state = source.state_dict()
    fresh = cube_grid(8)
    assert fresh.load_state_dict(state, "run/000010.tar") and fresh.ready and torch.equal(fresh.density,
                                                                                          source.density)
    names = []
    for name, damaged in damaged_grids(state):
        grid = cube_grid(8)
        before = grid.density.clone()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nerf"):
            assert not grid.load_state_dict(damaged, "run/000010.tar"), name
        assert not grid.ready and torch.equal(grid.density, before), name
        assert [r.getMessage() for r in caplog.records] == [
            "run/000010.tar: its occupancy grid is damaged; building a new one from the networks"], name
        names.append(name)
    assert len(names) == 18
    older = {k: v for k, v in state.items() if k != "observed"}        # saved before observations were kept
    grid = cube_grid(8)
    assert grid.load_state_dict(older, "run/000010.tar") and bool((grid.observed == -1).all())
