"""The occupancy-grid sampler (`--sampler occupancy`): a binary grid over the
scene marks where the network has density, and rays march through it in
fixed steps, skipping empty cells and stopping once they are opaque. Only the
surviving samples go through the network, as one packed batch, composited
per ray by `rendering.composite_packed` (the same alpha and maps as
`raw2outputs`).

    ray batch -> march (grid, early termination) -> network -> composite_packed
                                                       |
                        (training) the samples' densities -> grid (`observe`, merged at the next update)

An `OccupancyGrid` is reached by the renderer through one interface: with
`occupancy=grid` in the render kwargs, `rendering.batchify_rays` calls
`grid.render_rays(ray_batch, **render_kwargs)` instead of `render_rays`.
Until the grid is built (the first `warmup` training steps) that is the
default `render_rays` itself.

Shapes: N rays, P packed samples, C = R^3 cells (flattened x-major: cell
(i, j, k) is i R^2 + j R + k), the box [lo, hi] (3,) in the coordinates the
network sees (world, or NDC for forward-facing scenes).
"""
import logging
import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nerf import parallel, rendering
from nerf.errors import DataError

log = logging.getLogger("nerf")

CHECKPOINT_KEY = "occupancy_grid"
STEP_OPACITY = 0.01          # a cell is occupied when one marching step through it is at least this opaque
TERMINATION = 1e-4           # a ray stops once its transmittance is below this
# Each update multiplies every cell's estimate by EMA_DECAY, replaces it where the training samples since the
# last update found the network's density (`OccupancyGrid.observe`), then merges the new estimates by max: a cell
# the network has emptied leaves the grid whether or not it is re-estimated. Decaying only the re-estimated
# cells (as nerfacc does, re-estimating up to half its cells an update) left a 3000-step lego grid 99.3 %
# occupied at our 1/32 of the cells an update, where the network's density was above the threshold in 3 % of
# them. Measured on analytic blobs under a fog of 10 (tests/test_occupancy.py): 0.8 and 0.9 clear the fog in
# 16 and 31 updates but let up to 41 and 3 dense cells fall out between re-estimates; 0.95 clears it in 61 and
# lost none.
EMA_DECAY = 0.95
MARCH_CANDIDATES = 1 << 22   # (ray, step) pairs looked at in a block: rays = this / steps looked at a ray


def cell_centres(lo: torch.Tensor, hi: torch.Tensor, resolution: int, cells: Optional[torch.Tensor] = None,
                 jitter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Points (K, 3) in cells (K,) (all C when None): the centres, or with
    `jitter` (K, 3) in [0, 1) the points that far across each cell."""
    if cells is None:
        cells = torch.arange(resolution ** 3, device=lo.device)
    ijk = torch.stack([cells // resolution ** 2, (cells // resolution) % resolution, cells % resolution], -1)
    offset = 0.5 if jitter is None else jitter
    return lo + (ijk.to(lo.dtype) + offset) * (hi - lo) / resolution


def ray_cells(origins: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, resolution: int) -> torch.Tensor:
    """The flat cells (n, M) holding the points origins + t directions of n
    rays at depths t (n, M), origins and directions (n, 3) given in cell
    units (the box's lo at 0, its hi at `resolution`); points outside the
    box are clamped to the border cells. One axis at a time in int32: no
    (n, M, 3) tensor."""
    flat = torch.zeros_like(t, dtype=torch.int32)
    for axis in range(3):
        ijk = torch.addcmul(origins[:, axis:axis + 1], directions[:, axis:axis + 1], t)
        flat.mul_(resolution).add_(ijk.to(torch.int32).clamp_(0, resolution - 1))   # toward zero = floor from 0 up
    return flat.long()


def point_cells(pts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, resolution: int) -> torch.Tensor:
    """The flat cells (K,) holding points (K, 3) of the box [lo, hi] (clamped to its border cells)."""
    ijk = ((pts - lo) * (resolution / (hi - lo))).to(torch.int32).clamp_(0, resolution - 1).long()
    return (ijk[:, 0] * resolution + ijk[:, 1]) * resolution + ijk[:, 2]


def neighbourhood_max(values: torch.Tensor, resolution: int) -> torch.Tensor:
    """The largest of each cell's value and its 26 neighbours' (the 3x3x3
    window, cut at the border) for values (C,) on the `resolution`^3 grid:
    three passes of three cells, one along each axis, over the grid padded
    with the dtype's least value (F.max_pool3d's result, at a tenth of its
    time and more on the CPU)."""
    v = values.reshape((resolution,) * 3)
    low = -math.inf if v.dtype.is_floating_point else torch.iinfo(v.dtype).min
    for axis in range(3):
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1         # F.pad lists the last axis first
        p = F.pad(v, pad, value=low)
        v = torch.maximum(torch.maximum(p.narrow(axis, 0, resolution), p.narrow(axis, 1, resolution)),
                          p.narrow(axis, 2, resolution))
    return v.reshape(-1)


def seen_by_cameras(pts: torch.Tensor, poses: torch.Tensor, K: np.ndarray, H: int, W: int, near: float,
                    far: float, radius: float = 0.0) -> torch.Tensor:
    """How many cameras (poses (M, 3, 4) camera-to-world, OpenGL axes as
    `get_rays`) see each point (K, 3) between near and far along their
    axis, inside the image: counts (K,). `radius` widens the test by a ball
    of that radius around each point (a cell's half diagonal)."""
    fx, fy, cx, cy = float(K[0][0]), float(K[1][1]), float(K[0][2]), float(K[1][2])
    count = torch.zeros(pts.shape[0], dtype=torch.long, device=pts.device)
    for c2w in poses:
        local = (pts - c2w[:3, 3]) @ c2w[:3, :3]         # camera axes: x right, y up, looking along -z
        z = -local[:, 2]
        ahead = z.clamp(min=1e-6)
        u = cx + fx * local[:, 0] / ahead
        v = cy - fy * local[:, 1] / ahead
        mu, mv = fx * radius / ahead, fy * radius / ahead
        inside = ((z >= near - radius) & (z <= far + radius) & (u >= -0.5 - mu) & (u <= W - 0.5 + mu)
                  & (v >= -0.5 - mv) & (v <= H - 0.5 + mv))
        count += inside.long()
    return count


def scene_box(poses: torch.Tensor, K: np.ndarray, H: int, W: int, near: float, far: float,
              probe: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """The box (lo, hi), each (3,), around what at least half of the training
    cameras (poses (M, 3, 4)) see between near and far: an object captured
    from all around is in every picture, so it lies inside. Found on a
    `probe`^3 lattice over the box of all the cameras' frusta, and padded
    by one lattice cell."""
    fx, fy, cx, cy = float(K[0][0]), float(K[1][1]), float(K[0][2]), float(K[1][2])
    corners = torch.tensor([[(u - cx) / fx, -(v - cy) / fy, -1.0] for u in (0, W) for v in (0, H)],
                           dtype=poses.dtype, device=poses.device)
    ends = torch.cat([poses[:, None, :3, 3] + d * (corners @ poses[:, :3, :3].transpose(1, 2)) for d in (near, far)], 1)
    lo, hi = ends.reshape(-1, 3).min(0).values, ends.reshape(-1, 3).max(0).values
    pts = cell_centres(lo, hi, probe)
    seen = seen_by_cameras(pts, poses, K, H, W, near, far) * 2 >= poses.shape[0]
    if not bool(seen.any()):
        return lo, hi
    pad = (hi - lo) / probe
    return (pts[seen].min(0).values - pad).clamp(min=lo), (pts[seen].max(0).values + pad).clamp(max=hi)


def visible_cells(lo: torch.Tensor, hi: torch.Tensor, resolution: int, poses: torch.Tensor, K: np.ndarray, H: int,
                  W: int, near: float, far: float, coarse: int = 32) -> torch.Tensor:
    """Which of the box's `resolution`^3 cells (C,) some camera (poses (M, 3, 4))
    may see: decided on a lattice of at most `coarse`^3 cells (a ball around
    each that holds the cell), a fine cell being visible where a coarse
    cell it overlaps is."""
    Rc = min(resolution, coarse)
    radius = float((hi - lo).norm()) / Rc / 2
    seen = seen_by_cameras(cell_centres(lo, hi, Rc), poses, K, H, W, near, far, radius) > 0
    i = torch.arange(resolution, device=lo.device)
    first, last = i * Rc // resolution, ((i + 1) * Rc - 1) // resolution     # the coarse cells each fine one overlaps
    seen = seen.reshape(Rc, Rc, Rc)
    out = torch.zeros(resolution, resolution, resolution, dtype=torch.bool, device=lo.device)
    for a in (first, last):
        for b in (first, last):
            for c in (first, last):
                out |= seen[a[:, None, None], b[None, :, None], c[None, None, :]]
    return out.reshape(-1)


class OccupancyGrid:
    """A binary occupancy grid of `resolution`^3 cells over the box [lo, hi]
    and the marching through it.

    `density` (C,) holds each cell's running estimate of the network's
    density (after its activation): the largest of its re-estimates since the
    training samples last found it, and of what they found, each decayed by
    EMA_DECAY at every update since; +inf while unknown. `observed` (C,): the
    largest density the training samples found in each cell since the last
    update, -1 where none. `visible` (C,)
    the cells some training camera sees (the others stay empty). A cell is
    occupied when it is visible and its estimate, or that of one of its 26
    neighbours, exceeds min(threshold, mean estimate), threshold being the
    density at which one marching step has opacity STEP_OPACITY (the mean
    keeps a young network's faint densities; the neighbours cover the parts
    of a cell denser than the one point its estimate comes from); a grid with no occupied cell falls back to all
    visible cells, so that no run loses its samples for good.

    Rays march in steps of `step_size` = box diagonal / `n_steps` (world
    units of the network's coordinates); early termination reads `opaque`
    (C,), the least estimate among each cell and its neighbours (a ray
    that grazes a dense cell's empty part must not stop there, so only cells
    inside a dense region count). `generator` draws the cells and
    points of each update (its state goes into checkpoints)."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, resolution: int, visible: torch.Tensor, n_steps: int,
                 seed: int, cells_per_update: int, warmup: int, interval: int):
        self.lo, self.hi, self.resolution = lo, hi, resolution
        self.visible = visible
        self.n_steps, self.warmup, self.interval = n_steps, warmup, interval
        self.cells_per_update = min(cells_per_update, resolution ** 3)
        self.step_size = float((hi - lo).norm()) / n_steps
        self.threshold = -math.log(1.0 - STEP_OPACITY) / self.step_size
        self.density = torch.where(visible, torch.full_like(visible, math.inf, dtype=torch.float32),
                                   torch.zeros_like(visible, dtype=torch.float32))
        self.generator = torch.Generator(device=lo.device)
        self.generator.manual_seed(seed)
        self.termination = TERMINATION
        self.ready = False
        cell = float((hi - lo).min()) / resolution
        self.segment_steps = max(1, int(2 * cell / self.step_size))        # a segment spans at most two cells
        self.coarse_reach = int(self.segment_steps * self.step_size / 2 / cell) + 1
        self.set_binary(visible.clone(), torch.zeros_like(self.density))
        self.observed = torch.full_like(self.density, -1.0)

    # --- the grid ---------------------------------------------------------

    def set_binary(self, binary: torch.Tensor, opaque: torch.Tensor) -> None:
        """`binary` and `opaque` (C,), and what marching reads of them:
        `march_table` (C,), opaque where occupied and -1 where empty (one
        lookup a step), and `coarse` (C,), binary widened by `coarse_reach`
        cells each way, so that every point within half a segment
        (segment_steps steps) of a point in a cell lies in a cell it holds."""
        self.binary, self.opaque = binary, opaque
        self.march_table = torch.where(binary, opaque, torch.full_like(opaque, -1.0))
        widened = binary.to(torch.uint8)
        for _ in range(self.coarse_reach):
            widened = neighbourhood_max(widened, self.resolution)
        self.coarse = widened > 0

    def refresh_binary(self) -> None:
        """`binary` and `opaque` from `density` (device operations only)."""
        mean = self.density.sum() / self.visible.sum().clamp(min=1)        # cells no camera sees hold 0
        above = (self.density > torch.clamp(mean, max=self.threshold)).to(torch.uint8)
        occupied = self.visible & (neighbourhood_max(above, self.resolution) > 0)
        known = torch.nan_to_num(self.density, posinf=0.0)
        self.set_binary(occupied | (self.visible & ~occupied.any()), -neighbourhood_max(-known, self.resolution))

    def evaluate(self, density_fn: Callable, cells: torch.Tensor) -> None:
        """Re-estimates `cells` (K,): the network's density at one jittered point
        in each, merged as max(old, new) (new alone where unknown).
        Deterministic for a generator state: duplicates merge by max."""
        jitter = torch.rand(cells.shape[0], 3, generator=self.generator, device=self.lo.device)
        with torch.no_grad():
            sigma = density_fn(cell_centres(self.lo, self.hi, self.resolution, cells, jitter)).float()
        sigma = torch.where(self.visible[cells], sigma, torch.zeros_like(sigma))
        old = self.density[cells]
        self.density.index_put_((cells,), torch.where(torch.isinf(old), torch.zeros_like(old), old))
        self.density.scatter_reduce_(0, cells, sigma, "amax")

    def build(self, density_fn: Callable) -> None:
        """Estimates every cell once (the end of the warm-up, or a network
        trained without a grid) and starts marching."""
        cells = torch.arange(self.resolution ** 3, device=self.lo.device)
        for part in cells.split(1 << 16):
            self.evaluate(density_fn, part)
        self.refresh_binary()
        self.ready = True

    def update(self, density_fn: Callable) -> None:
        """Decays every estimate by EMA_DECAY, takes the training samples'
        densities where they found any (every rank's: their max), re-estimates
        `cells_per_update` cells drawn uniformly and as many drawn from the
        occupied ones, then rethresholds."""
        n, C = self.cells_per_update, self.resolution ** 3
        self.density.mul_(EMA_DECAY)
        parallel.all_reduce_max_(self.observed)
        self.density = torch.where((self.observed >= 0) & self.visible, self.observed, self.density)
        self.observed.fill_(-1.0)
        uniform = torch.randint(0, C, (n,), generator=self.generator, device=self.lo.device)
        ranked = torch.cumsum(self.binary, 0)                           # the j-th occupied cell: first rank j + 1
        j = (torch.rand(n, generator=self.generator, device=self.lo.device) * ranked[-1]).long()
        occupied = torch.searchsorted(ranked, j + 1).clamp(max=C - 1)
        self.evaluate(density_fn, torch.cat([uniform, occupied]))
        self.refresh_binary()

    def training_step(self, step: int, density_fn: Callable) -> None:
        """Before training step `step` (1-based): builds the grid after the
        warm-up, then updates it every `interval` steps."""
        if not self.ready:
            if step > self.warmup:
                self.build(density_fn)
        elif step % self.interval == 0:
            self.update(density_fn)

    def observe(self, pts: torch.Tensor, sigma: torch.Tensor) -> None:
        """What a training step's samples found: the densities sigma (P,)
        (after the activation) at points pts (P, 3). Each cell keeps the
        largest found in it until the next update (`observed`): free
        estimates of exactly the cells the rays cross, with no host
        synchronisation."""
        cells = point_cells(pts.detach(), self.lo, self.hi, self.resolution)
        self.observed.scatter_reduce_(0, cells, sigma.detach().float(), "amax")

    def restart(self) -> None:
        """Forgets what the grid learnt (the networks were drawn afresh): warm-up again from now."""
        self.density = torch.where(self.visible, torch.full_like(self.density, math.inf),
                                   torch.zeros_like(self.density))
        self.observed.fill_(-1.0)
        self.set_binary(self.visible.clone(), torch.zeros_like(self.density))
        self.ready = False

    # --- marching ---------------------------------------------------------

    def box_span(self, rays_o: torch.Tensor, rays_d: torch.Tensor, near: torch.Tensor, far: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where rays (N, 3) enter and leave the box, within near and far
        (N, 1): t0 and t1 (N, 1) (t1 <= t0 for a ray that misses it), and a
        marching step's length in t, dt = step_size / |d| (N, 1)."""
        dt = self.step_size / rays_d.norm(dim=-1, keepdim=True)
        safe_d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
        t_lo, t_hi = (self.lo - rays_o) / safe_d, (self.hi - rays_o) / safe_d
        t0 = torch.maximum(torch.minimum(t_lo, t_hi).max(-1, keepdim=True).values, near)
        t1 = torch.minimum(torch.maximum(t_lo, t_hi).min(-1, keepdim=True).values, far)
        return t0, t1, dt

    def candidate_segments(self, rays_o: torch.Tensor, rays_d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                           dt: torch.Tensor) -> torch.Tensor:
        """Which segments of `segment_steps` steps from t0 on (all
        ceil((n_steps + 1) / segment_steps) of them) may hold an occupied step
        of each ray (n, 3) (`box_span`'s t0, t1, dt (n, 1)): those that start
        before t1 and whose middle lies in a cell `coarse` holds. (n, Mc) bool."""
        k = self.segment_steps
        segment = torch.arange(-(-(self.n_steps + 1) // k), device=rays_o.device, dtype=rays_o.dtype)
        middles = t0 + (segment + 0.5) * k * dt
        to_cells = self.resolution / (self.hi - self.lo)
        cells = ray_cells((rays_o - self.lo) * to_cells, rays_d * to_cells, middles, self.resolution)
        return self.coarse[cells] & (middles - 0.5 * k * dt < t1)

    def march(self, rays_o: torch.Tensor, rays_d: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
              perturb: bool, max_per_ray: Optional[int] = None, compact: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The samples of rays (N, 3) each, between near and far (N, 1) and
        inside the box: ray index (P,), depth t (P,), sorted by ray then t,
        and the length delta (P,) (world units) each sample stands for.

        The steps: `n_steps` + 1 of `step_size` / |d| in t from where the
        ray enters, at the steps' middles (jittered by one uniform draw per
        ray with `perturb`). A step is kept when its cell is occupied and
        the transmittance that `opaque` gives up to it is at least
        `termination` (TERMINATION; 0 marches on to the end).

        Two levels, so that a ray's work follows its budget rather than the
        steps: the steps in segments of `segment_steps` (k), a segment a
        candidate when `coarse` is occupied at its middle (which holds every
        cell its steps lie in). Of the F = k x candidates' steps, `slots`
        (all with no `max_per_ray`, else 4 max_per_ray) are looked at: all
        when F <= slots, else every s-th, s = ceil(F / slots), from a
        random start in [0, s) with `perturb`, each standing for s steps.
        With `max_per_ray`, a ray that keeps c > max_per_ray of those keeps
        every s2-th, s2 = ceil(c / max_per_ray), standing in equal shares
        for the s c steps the c stood for: a grid that has not yet learnt
        where the scene is empty marches coarsely, at no more samples than
        that. One host synchronisation (the count) per MARCH_CANDIDATES
        looked-at steps; with `compact` (rendering, where synchronisations
        cost little) two more, to look only at the rays with a candidate
        segment and at no more slots than the longest of them fills: the
        same samples, for a fraction of the work where most rays miss the
        scene."""
        t0, t1, dt = self.box_span(rays_o, rays_d, near, far)
        shift = torch.rand_like(t0) if perturb else torch.full_like(t0, 0.5)
        start_draw = torch.rand_like(t0) if perturb else torch.zeros_like(t0)
        M, k = self.n_steps + 1, self.segment_steps
        Mc = -(-M // k)
        slots = Mc * k if max_per_ray is None else min(Mc * k, 4 * max_per_ray)
        segment_index = torch.arange(Mc, device=rays_o.device)
        slot = torch.arange(slots, device=rays_o.device)
        to_cells = self.resolution / (self.hi - self.lo)
        origins, directions = (rays_o - self.lo) * to_cells, rays_d * to_cells
        stop = -math.log(self.termination) if self.termination > 0 else math.inf
        rays, depths, deltas = [], [], []
        block = max(1, MARCH_CANDIDATES // max(slots, Mc))
        for first in range(0, rays_o.shape[0], block):
            sl = slice(first, first + block)
            candidate = self.candidate_segments(rays_o[sl], rays_d[sl], t0[sl], t1[sl], dt[sl])     # (n, Mc)
            ranked = torch.cumsum(candidate, -1)                                             # (n, Mc)
            F = ranked[:, -1:] * k                                                           # (n, 1)
            rows, width = torch.arange(ranked.shape[0], device=rays_o.device), slots
            if compact:      # only the rays with a candidate, only as many slots as the longest of them needs
                rows = (F[:, 0] > 0).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                candidate, ranked, F = candidate[rows], ranked[rows], F[rows]
                width = min(slots, int(F.max()))
            rows = rows + first
            s = (F + slots - 1).div(slots, rounding_mode="floor").clamp(min=1)
            r = slot[:width] * s + (start_draw[rows] * s).long().clamp(max=s - 1)          # (n, width)
            nth = torch.full((ranked.shape[0], Mc + 1), Mc - 1, dtype=torch.long, device=rays_o.device)
            nth.scatter_(1, torch.where(candidate, ranked - 1, Mc), segment_index.expand_as(ranked))
            q = r.div(k, rounding_mode="floor")
            m = nth.gather(1, q.clamp(max=Mc)) * k + r - q * k                              # the step looked at
            t = t0[rows] + (m + shift[rows]) * dt[rows]
            v = self.march_table[ray_cells(origins[rows], directions[rows], t, self.resolution)]
            occupied = (v >= 0) & (r < F) & (m < M) & (t < t1[rows])
            optical = torch.where(occupied, v, torch.zeros_like(v)).mul_(s * self.step_size)
            before = torch.cumsum(optical, -1).sub_(optical)
            keep = occupied & (before < stop)
            share = s.to(t.dtype)
            if max_per_ray is not None:
                c = keep.sum(-1, keepdim=True)
                s2 = (c + max_per_ray - 1).div(max_per_ray, rounding_mode="floor").clamp(min=1)
                keep = keep & ((torch.cumsum(keep, -1) - 1) % s2 == 0)
                share = share * c / ((c + s2 - 1).div(s2, rounding_mode="floor")).clamp(min=1)
            kept = keep.reshape(-1).nonzero().squeeze(1)
            ray = kept.div(width, rounding_mode="floor")
            rays.append(rows[ray])
            depths.append(t.reshape(-1)[kept])
            deltas.append(share[ray, 0] * self.step_size)
        if not rays:
            return (torch.zeros(0, dtype=torch.long, device=rays_o.device), rays_o.new_zeros(0), rays_o.new_zeros(0))
        return torch.cat(rays), torch.cat(depths), torch.cat(deltas)

    def render_rays(self, ray_batch: torch.Tensor, network_fn: Callable, network_query_fn: Callable,
                    N_samples: int = 0, perturb: float = 0.0, network_fine: Optional[Callable] = None,
                    white_bkgd: bool = False, raw_noise_std: float = 0.0, median_depth: bool = False,
                    density_activation: str = "relu", **default_only) -> dict:
        """`rendering.render_rays`' outputs for a ray batch (N, 8 or 11):
        rgb_map (N, 3), disp_map (N,), acc_map (N,) (and t_median (N,) with
        `median_depth`), from the marched samples through one network (the
        fine one when there is one), at most N_samples a ray (the default's
        coarse pass: a ray through a grid still full of a young network's fog
        costs a third of the default's queries; see `march` for how the
        samples spread over a ray with more occupied steps). Before the grid
        is built: the default `render_rays`, with every keyword."""
        if not self.ready:
            return rendering.render_rays(ray_batch, network_fn, network_query_fn, N_samples, perturb=perturb,
                                         network_fine=network_fine, white_bkgd=white_bkgd,
                                         raw_noise_std=raw_noise_std, median_depth=median_depth,
                                         density_activation=density_activation, **default_only)
        rays_o, rays_d = ray_batch[:, 0:3], ray_batch[:, 3:6]
        viewdirs = ray_batch[:, -3:] if ray_batch.shape[-1] > 8 else None
        ray, t, delta = self.march(rays_o, rays_d, ray_batch[:, 6:7], ray_batch[:, 7:8], perturb > 0, N_samples,
                                   compact=not torch.is_grad_enabled())
        pts = rays_o[ray] + rays_d[ray] * t[:, None]
        network = network_fn if network_fine is None else network_fine
        raw = network_query_fn(pts[:, None], None if viewdirs is None else viewdirs[ray], network)[:, 0]
        if raw.requires_grad:                      # training: the samples' densities refresh the grid
            self.observe(pts, rendering.density(raw[:, 3], density_activation))
        return rendering.composite_packed(raw, t, delta, ray, ray_batch.shape[0], raw_noise_std, white_bkgd,
                                          density_activation, median_depth)

    # --- checkpoints ------------------------------------------------------

    def state_dict(self) -> dict:
        return {"resolution": self.resolution, "lo": self.lo.cpu(), "hi": self.hi.cpu(), "ready": self.ready,
                "density": self.density.cpu(), "observed": self.observed.cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, where) -> bool:
        """Takes a checkpoint's grid when it has this grid's resolution and box;
        returns whether it did. A grid is derived from the networks, so one
        that is damaged (a missing entry, a density or observation of another
        shape, NaN or below its least value) is said in one line and built
        anew, never fatal. A grid saved before observations were kept has none."""
        C = self.resolution ** 3

        def bad(values, least: float) -> bool:
            return (not isinstance(values, torch.Tensor) or values.shape != (C,) or not values.is_floating_point()
                    or bool(torch.isnan(values).any()) or bool((values < least).any()))
        try:
            lo, hi = torch.as_tensor(state["lo"]).to(self.lo), torch.as_tensor(state["hi"]).to(self.hi)
            density, ready, generator = state["density"], bool(state["ready"]), state["generator"]
            observed = state.get("observed", torch.full((C,), -1.0))
            damaged = bad(density, 0.0) or bad(observed, -1.0) or lo.shape != (3,) or hi.shape != (3,)
        except (KeyError, TypeError, ValueError, RuntimeError):
            damaged = True
        if damaged:
            log.info("%s: its occupancy grid is damaged; building a new one from the networks", where)
            return False
        if state.get("resolution") != self.resolution or not torch.allclose(lo, self.lo) or \
                not torch.allclose(hi, self.hi):
            log.info("%s: its occupancy grid has another resolution or box; building a new one", where)
            return False
        self.density = torch.where(self.visible, density.to(self.density), torch.zeros_like(self.density))
        self.observed = observed.to(self.observed)
        try:
            self.generator.set_state(generator)
        except (RuntimeError, TypeError):
            log.info("%s: its occupancy grid's generator is another device's; the grid's draws start afresh", where)
        self.ready = ready
        self.refresh_binary()
        return True


def network_density(render_kwargs: dict) -> Callable:
    """The density (K,) (after the density activation) of the network the
    sampler marches with (the fine one when there is one) at points (K, 3)."""
    query = render_kwargs["network_query_fn"]
    network = render_kwargs.get("network_fine") or render_kwargs["network_fn"]
    activation = render_kwargs.get("density_activation", "relu")
    use_viewdirs = render_kwargs.get("use_viewdirs", False)
    density_only = rendering.accepts_density_only(query)

    def density_fn(pts: torch.Tensor) -> torch.Tensor:
        dirs = None
        if use_viewdirs:                     # any direction: a NeRF's density does not depend on it
            dirs = torch.zeros_like(pts)
            dirs[:, 2] = 1.0
        if density_only:
            sigma = query(pts[:, None], dirs, network, density_only=True)[:, 0, 0]
        else:
            sigma = query(pts[:, None], dirs, network)[:, 0, 3]
        return rendering.density(sigma, activation)

    return density_fn


def parse_box(text: str) -> Tuple[float, ...]:
    """`--occupancy_box "x0 y0 z0 x1 y1 z1"` (commas allowed) as six numbers with lo < hi."""
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if len(values) != 6 or not all(math.isfinite(v) for v in values) or \
            not all(a < b for a, b in zip(values[:3], values[3:])):
        raise DataError("--occupancy_box", f"expected six numbers 'x0 y0 z0 x1 y1 z1' with x0 < x1, y0 < y1, "
                                           f"z0 < z1, got '{text}'")
    return values


def grid_for_scene(args, scene, ndc: bool, device: torch.device) -> OccupancyGrid:
    """The run's grid: over the NDC cube [-1, 1]^3 for forward-facing scenes
    (every cell visible: the cube is the reference camera's frustum), else
    over `--occupancy_box` or `scene_box`, the cells no training camera sees
    left empty. Says which box it uses."""
    R = args.occupancy_resolution
    poses = torch.as_tensor(np.asarray(scene.poses)[scene.i_train, :3, :4], dtype=torch.float32, device=device)
    if ndc:
        lo, hi = -torch.ones(3, device=device), torch.ones(3, device=device)
        how = "the NDC cube; a forward-facing scene fills it, and on fern the default sampler measured better"
    elif args.occupancy_box is not None:
        box = torch.tensor(parse_box(args.occupancy_box), device=device)
        lo, hi = box[:3], box[3:]
        how = "--occupancy_box"
    else:
        lo, hi = scene_box(poses, scene.K, scene.H, scene.W, float(scene.near), float(scene.far))
        how = "what half of the training cameras see between near and far"
    if ndc:
        visible = torch.ones(R ** 3, dtype=torch.bool, device=device)
    else:
        visible = visible_cells(lo, hi, R, poses, scene.K, scene.H, scene.W, float(scene.near), float(scene.far))
    log.info("occupancy grid: %d^3 cells over [%s] x [%s] (%s), %d marching steps across its diagonal",
             R, ", ".join(f"{v:.3g}" for v in lo.tolist()), ", ".join(f"{v:.3g}" for v in hi.tolist()), how,
             args.occupancy_steps)
    return OccupancyGrid(lo, hi, R, visible, args.occupancy_steps, args.seed, args.occupancy_cells,
                         args.occupancy_warmup, args.occupancy_interval)


def attach(args, scene, render_kwargs_train: dict, render_kwargs_test: dict, ckpt: Optional[dict], ckpt_path,
           device: torch.device, rendering_only: Optional[bool] = None) -> None:
    """With `--sampler occupancy`: the run's grid in both render kwargs
    (`occupancy`), resumed from the checkpoint's grid, or (a network trained
    without one, rendered: `rendering_only`, by default --render_only) built
    from the network now. With the default
    sampler, renders of a network trained with the occupancy sampler take
    its fine network for the coarse pass too (the coarse one stopped
    learning after the warm-up)."""
    trained_with = (ckpt or {}).get("sampler", "hierarchical")
    if args.sampler != "occupancy":
        if trained_with == "occupancy" and render_kwargs_test.get("network_fine") is not None:
            render_kwargs_test["network_fn"] = render_kwargs_test["network_fine"]
        return
    grid = grid_for_scene(args, scene, render_kwargs_train.get("ndc", True), device)
    if ckpt is not None and ckpt.get(CHECKPOINT_KEY) is not None:
        grid.load_state_dict(ckpt[CHECKPOINT_KEY], ckpt_path)
    if (args.render_only if rendering_only is None else rendering_only) and not grid.ready:
        grid.build(network_density(render_kwargs_test))
    render_kwargs_train["occupancy"] = grid
    render_kwargs_test["occupancy"] = grid


def before_step(render_kwargs: dict, step: int) -> None:
    """Grid upkeep before training step `step` (`OccupancyGrid.training_step`); nothing without a grid."""
    grid = render_kwargs.get("occupancy")
    if grid is not None:
        grid.training_step(step, network_density(render_kwargs))


def merge_observations(render_kwargs: dict) -> None:
    """Before a checkpoint (every rank): the grid's pending observations
    become every rank's max, as the next update makes them, so that rank 0's
    checkpoint holds all of them; nothing without a grid."""
    grid = render_kwargs.get("occupancy")
    if grid is not None:
        parallel.all_reduce_max_(grid.observed)


def restart(render_kwargs: dict) -> None:
    """The collapse guard drew new networks: the grid forgets the old ones' densities."""
    grid = render_kwargs.get("occupancy")
    if grid is not None:
        grid.restart()


def checkpoint_entries(args, render_kwargs: dict) -> dict:
    """The checkpoint's `sampler` (what it was trained with) and, with the
    occupancy sampler, its grid and the grid's generator state."""
    grid = render_kwargs.get("occupancy")
    return {"sampler": args.sampler, **({CHECKPOINT_KEY: grid.state_dict()} if grid is not None else {})}
