"""Geometry out of a trained NeRF: a coloured mesh or a point cloud, in world coordinates.

    python extract_mesh.py --config configs/lego.txt                 # mesh_<step>.ply
    python extract_mesh.py --config configs/fern.txt --pointcloud    # pointcloud_<step>.ply

Reloads the newest checkpoint of basedir/expname (or --ft_path) exactly as
`run_nerf.py --render_only` does, with the training config's flags, on
`--device` (default: CUDA, else MPS, else the CPU).

Mesh: the density sigma = relu(raw sigma) (softplus with --density_activation
softplus) of the fine network (the coarse one when there is none) on a regular
lattice over a box in render space (NDC for forward-facing scenes), marching cubes at a density level, vertices mapped to
world coordinates, each vertex coloured by rendering a short ray that looks
at it along its inward normal. Point cloud: every training view's pixels
(or every k-th) rendered, each ray's mean termination point in world
coordinates with its colour, rays with accumulated opacity below 0.5 dropped.
docs/geometry.md explains the defaults (level and box) and the limits.
The file is written whole or not at all (nerf/outputs.py): a full disk is
one line, `error: <file>: <reason>`, exit status 1.
"""
import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nerf import data_checks, flags, geometry, outputs, run_folder
import run_nerf
from nerf.checkpoints import find_checkpoint
from nerf.datasets import Scene, load_scene
from nerf.errors import DataError, exit_status
from nerf.rendering import accepts_density_only, batchify_rays, density, render
import run_nerf_helpers as helpers     # get_rays looked up at call time: a fork may replace it
from run_nerf_helpers import keep_freed_memory

log = logging.getLogger("nerf")

REQUIREMENTS = "requirements-mesh.txt"
PROBE_RAYS = 4096             # training rays rendered to choose the default level and the NDC far side
SURFACE_LEVEL_FRACTION = 0.5  # default level: this fraction of the median density where those rays stop
COLOUR_SAMPLES = 8            # coarse (and fine) samples of a vertex's colour ray
COLOUR_RAY_CELLS = 4          # the colour ray starts this many lattice cells outside the vertex
MIN_ACC = 0.5                 # rays less opaque than this hit nothing


def config_parser():
    """run_nerf's flags (the training config) plus the mesh and point cloud options."""
    parser = run_nerf.config_parser()
    group = parser.add_argument_group("mesh and point cloud")
    group.add_argument("--mesh_resolution", type=int, default=256,
                       help="lattice cells along the longest side of the box (at least 8)")
    group.add_argument("--mesh_threshold", type=float, default=None,
                       help="density level of the surface (default: chosen from the training views, printed)")
    group.add_argument("--mesh_bbox", type=float, nargs=6, default=None,
                       metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                       help="box to mesh, in render space (NDC for forward-facing scenes); "
                            "default: the region every training camera sees")
    group.add_argument("--mesh_format", type=str, default="ply", choices=["ply", "obj"], help="mesh file format")
    group.add_argument("--keep_largest_component", action="store_true",
                       help="drop every connected piece of the mesh but the largest")
    group.add_argument("--pointcloud", action="store_true",
                       help="write pointcloud_<step>.ply from the training views' depth instead of a mesh")
    group.add_argument("--pointcloud_stride", type=int, default=1,
                       help="back-project every k-th pixel (rows and columns) of each training view")
    return parser


def check_geometry_flags(args) -> None:
    """The mesh and point cloud flags' values, as one-line errors."""
    if args.mesh_resolution < 8:
        raise DataError("--mesh_resolution", f"must be at least 8, got {args.mesh_resolution}")
    if args.pointcloud_stride < 1:
        raise DataError("--pointcloud_stride", f"must be at least 1, got {args.pointcloud_stride}")
    if args.mesh_threshold is not None and not (math.isfinite(args.mesh_threshold) and args.mesh_threshold > 0):
        raise DataError("--mesh_threshold", f"must be a finite density > 0, got {args.mesh_threshold}")
    if args.mesh_bbox is not None:
        lo, hi = np.array(args.mesh_bbox[:3]), np.array(args.mesh_bbox[3:])
        if not np.all(np.isfinite(args.mesh_bbox)):
            raise DataError("--mesh_bbox", f"must be 6 finite numbers, got {args.mesh_bbox}")
        if np.any(lo >= hi):
            axes = ", ".join("xyz"[k] for k in np.flatnonzero(lo >= hi))
            raise DataError("--mesh_bbox", f"min must be below max on every axis (not on {axes}): "
                                           f"got min {lo.tolist()} max {hi.tolist()}")


def import_mesh_libraries():
    """trimesh and scikit-image's measure, or a one-line error naming requirements-mesh.txt."""
    try:
        import trimesh
        from skimage import measure
    except ImportError as exc:
        raise DataError(REQUIREMENTS, f"{exc.name} is not installed: pip install -r {REQUIREMENTS}") from None
    return trimesh, measure


# --- Densities and rays ---------------------------------------------------------

def query_density(pts: torch.Tensor, render_kwargs: dict, netchunk: int, desc: Optional[str] = None) -> torch.Tensor:
    """sigma = relu(raw sigma) (P,) (or the run's --density_activation) of the fine network (else the coarse one) at render-space
    points (P, 3), `netchunk` points at a time. Density does not depend on the view
    direction, so networks with view directions get a fixed one."""
    network = render_kwargs["network_fine"] or render_kwargs["network_fn"]
    query = render_kwargs["network_query_fn"]
    only_sigma = {"density_only": True} if accepts_density_only(query) else {}
    viewdir = torch.tensor([[0.0, 0.0, -1.0]], dtype=pts.dtype, device=pts.device)
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, pts.shape[0], netchunk), desc=desc, leave=False, dynamic_ncols=True,
                      disable=desc is None):
            chunk = pts[i:i + netchunk]
            viewdirs = viewdir.expand(chunk.shape[0], 3) if render_kwargs.get("use_viewdirs") else None
            raw = query(chunk[:, None, :], viewdirs, network, **only_sigma)
            out.append(density(raw[:, 0, 3 if raw.shape[-1] > 1 else 0],
                               render_kwargs.get("density_activation", "relu")))
    return torch.cat(out, 0)


def density_grid(axes, render_kwargs: dict, netchunk: int, device) -> np.ndarray:
    """Densities (nx, ny, nz) at the lattice points (axes[0][i], axes[1][j], axes[2][k]),
    with a progress bar; the points are made chunk by chunk from their flat index
    (only a chunk's indices are ever held: all of them would take 8.6 GB at 1024^3)."""
    axes_t = [torch.as_tensor(a, dtype=torch.float32, device=device) for a in axes]
    nx, ny, nz = (len(a) for a in axes)
    total = nx * ny * nz
    sigma = torch.empty(total, dtype=torch.float32)
    step = netchunk
    with tqdm(total=total, desc="density", unit="pt", unit_scale=True, dynamic_ncols=True) as bar:
        for i in range(0, total, step):
            idx = torch.arange(i, min(i + step, total), device=device)
            pts = torch.stack([axes_t[0][idx // (ny * nz)], axes_t[1][(idx // nz) % ny], axes_t[2][idx % nz]], -1)
            sigma[i:i + step] = query_density(pts, render_kwargs, netchunk).cpu()
            bar.update(idx.shape[0])
    return sigma.reshape(nx, ny, nz).numpy()


def render_surface(scene: Scene, poses: np.ndarray, render_kwargs: dict, ndc: bool, stride: int, chunk: int,
                   device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every `stride`-th pixel (rows and columns) of each pose (C, 3, 4) rendered without
    background; the rays with accumulated opacity >= 0.5. Returns their mean termination
    points in render space (P, 3) and their colours rgb / acc (P, 3)."""
    kwargs = dict(render_kwargs, white_bkgd=False, coarse_maps=not accepts_density_only(
        render_kwargs["network_query_fn"]))
    points, colours = [], []
    for c2w in tqdm(poses, desc="views", leave=False, dynamic_ncols=True):
        c2w = torch.as_tensor(c2w, dtype=torch.float32, device=device)
        rays_o, rays_d = helpers.get_rays(scene.H, scene.W, scene.K, c2w)
        rays_o, rays_d = rays_o[::stride, ::stride].reshape(-1, 3), rays_d[::stride, ::stride].reshape(-1, 3)
        with torch.no_grad():
            rgb, disp, acc, _ = render(scene.H, scene.W, scene.K, chunk=chunk, rays=(rays_o, rays_d), **kwargs)
        hit = acc >= MIN_ACC
        pts = geometry.termination_points(disp, acc, *geometry.render_space_rays(rays_o, rays_d, ndc, scene.hwK))
        points.append(pts[hit])
        colours.append((rgb[hit] / acc[hit, None]).clamp(0, 1))
    return torch.cat(points, 0), torch.cat(colours, 0)


def probe_stride(scene: Scene) -> int:
    """The pixel stride that gives about PROBE_RAYS rays over the training views."""
    return max(1, math.ceil(math.sqrt(len(scene.i_train) * scene.H * scene.W / PROBE_RAYS)))


# --- Defaults: box and level --------------------------------------------------

def default_bbox(scene: Scene, ndc: bool, probe_pts: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """The render-space box every training camera sees between near and far
    (`geometry.seen_region`); for NDC scenes, whose far plane is at infinity, cut at
    the 99th percentile of the training rays' NDC depth z' (`probe_pts` (P, 3))."""
    lo, hi = geometry.seen_region(scene.poses[scene.i_train], scene.K, scene.H, scene.W, scene.near, scene.far,
                                  ndc, scene.hwK)
    if lo is None:
        raise DataError("--mesh_bbox", "no region is seen by every training camera; give the box to mesh")
    lo, hi = lo.numpy(), hi.numpy()
    if ndc and probe_pts.shape[0]:
        z_far = float(torch.quantile(probe_pts[:, 2].cpu().double(), 0.99))
        hi[2] = min(hi[2], z_far + 0.02 * (hi[2] - lo[2]))
    return lo, hi


def default_threshold(probe_pts: torch.Tensor, render_kwargs: dict, netchunk: int) -> float:
    """SURFACE_LEVEL_FRACTION of the median density at the training rays' mean
    termination points `probe_pts` (P, 3): the level set through the surfaces the
    network renders, moved a little outwards (densities rise steeply into a solid)."""
    if probe_pts.shape[0] == 0:
        raise DataError("--mesh_threshold", "no training ray reaches opacity 0.5 (is the network trained?); "
                                            "give a density level")
    sigma = query_density(probe_pts, render_kwargs, netchunk)
    level = SURFACE_LEVEL_FRACTION * float(torch.median(sigma))
    if not level > 0:
        raise DataError("--mesh_threshold", "the density where the training rays stop is 0; give a density level")
    return level


# --- Mesh ------------------------------------------------------------------------

def marching_cubes(measure, sigma: np.ndarray, level: float, lo: np.ndarray, h: float) -> Tuple[np.ndarray, np.ndarray]:
    """The level set of densities (nx, ny, nz) sampled at lo + h (i, j, k): vertices (V, 3)
    in those coordinates and faces (F, 3) wound counter-clockwise seen from outside
    (lower density), so that their normals point out of the solid."""
    low, high = float(sigma.min()), float(sigma.max())
    if not low < level < high:
        raise DataError("--mesh_threshold", f"no surface at density {level:g}: the densities in the box "
                                            f"range from {low:g} to {high:g}")
    verts, faces, _, _ = measure.marching_cubes(sigma, level=level, spacing=(h, h, h))
    return verts.astype(np.float64) + lo, np.ascontiguousarray(faces[:, ::-1])


def vertex_colours(verts: torch.Tensor, normals: torch.Tensor, h: float, render_kwargs: dict, ndc: bool, hwf,
                   chunk: int) -> torch.Tensor:
    """Colours (V, 3) in [0, 1] of render-space vertices (V, 3) with outward unit normals (V, 3):
    each renders the ray that starts COLOUR_RAY_CELLS lattice cells h outside the vertex and
    looks at it along the inward normal, through as many cells inside, without background,
    divided by its opacity. The view direction is the ray's direction in world coordinates."""
    rays_o, rays_d = verts + COLOUR_RAY_CELLS * h * normals, -normals
    viewdirs = geometry.to_world(verts, ndc, hwf) - geometry.to_world(verts + 0.1 * h * normals, ndc, hwf)
    viewdirs = viewdirs / torch.norm(viewdirs, dim=-1, keepdim=True)
    near = torch.zeros_like(rays_o[:, :1])
    rays = [rays_o, rays_d, near, near + 2 * COLOUR_RAY_CELLS * h]
    if render_kwargs.get("use_viewdirs"):
        rays.append(viewdirs)
    kwargs = {k: v for k, v in render_kwargs.items() if k not in ("ndc", "use_viewdirs", "near", "far")}
    kwargs.update(white_bkgd=False, N_samples=COLOUR_SAMPLES,
                  N_importance=COLOUR_SAMPLES if render_kwargs.get("N_importance", 0) > 0 else 0)
    with torch.no_grad():
        out = batchify_rays(torch.cat(rays, -1).float(), chunk, **kwargs)
    acc = out["acc_map"].clamp(min=1e-6)
    return (out["rgb_map"] / acc[:, None]).clamp(0, 1)


def extract_mesh(trimesh, measure, scene: Scene, render_kwargs: dict, ndc: bool, lo: np.ndarray, hi: np.ndarray,
                 level: float, resolution: int, keep_largest: bool, netchunk: int, chunk: int, device):
    """The coloured mesh (a trimesh.Trimesh, world coordinates) of the density level set
    in the render-space box [lo, hi]."""
    axes, h = geometry.grid_axes(lo, hi, resolution)
    log.info("lattice %d x %d x %d, cell %.4g, box %s to %s", *(len(a) for a in axes), h,
             np.round(lo, 4).tolist(), np.round(hi, 4).tolist())
    sigma = density_grid(axes, render_kwargs, netchunk, device)
    verts, faces = marching_cubes(measure, sigma, level, np.asarray(lo, dtype=np.float64), h)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    if keep_largest:
        pieces = mesh.split(only_watertight=False)
        mesh = max(pieces, key=lambda m: len(m.faces))
    verts = torch.as_tensor(np.array(mesh.vertices), dtype=torch.float32, device=device)
    normals = torch.as_tensor(np.array(mesh.vertex_normals), dtype=torch.float32, device=device)
    colours = vertex_colours(verts, normals, h, render_kwargs, ndc, scene.hwK, chunk)
    world = geometry.to_world(verts.cpu().double(), ndc, scene.hwK).numpy()
    faces = np.asarray(mesh.faces)
    if ndc:
        faces = faces[:, ::-1]    # the NDC map reverses orientation (its Jacobian's determinant is negative)
    rgba = np.concatenate([np.round(colours.cpu().numpy() * 255), np.full((len(world), 1), 255)], 1)
    return trimesh.Trimesh(world, faces, vertex_colors=rgba.astype(np.uint8), process=False)


# --- Command line ----------------------------------------------------------------

def load_trained(args, device):
    """Scene, test-time render kwargs (with near/far), NDC flag and checkpoint step,
    reloaded exactly as --render_only does; a run folder without a checkpoint is an error."""
    scene = load_scene(args)
    expdir = Path(args.basedir) / str(args.expname)
    ckpt_path, ckpt = find_checkpoint(expdir, args.ft_path, args.no_reload)
    if ckpt is None:
        raise DataError(expdir, "no checkpoint to extract geometry from (train first, or give --ft_path)")
    render_kwargs, _ = run_nerf.load_for_rendering(args, scene, device, ckpt, ckpt_path)
    return scene, render_kwargs, render_kwargs.get("ndc", True), int(ckpt["global_step"])


def extract(argv=None) -> int:
    args = flags.parse_args(config_parser(), argv)
    check_geometry_flags(args)
    trimesh, measure = import_mesh_libraries()
    data_checks.check_data(args)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = flags.choose_device(args.device)
    scene, render_kwargs, ndc, step = load_trained(args, device)
    expdir = outputs.make_folder(Path(args.basedir) / str(args.expname))

    if args.pointcloud:
        pts, colours = render_surface(scene, scene.poses[scene.i_train], render_kwargs, ndc,
                                      args.pointcloud_stride, args.chunk, device)
        world = geometry.to_world(pts.cpu().double(), ndc, scene.hwK).numpy()
        rgba = np.concatenate([np.round(colours.cpu().numpy() * 255), np.full((len(world), 1), 255)], 1)
        cloud = trimesh.PointCloud(world, colors=rgba.astype(np.uint8))
        path = run_folder.keep_earlier(expdir / f"pointcloud_{step:06d}.ply")
        write_geometry(path, cloud)
        log.info("%d points from %d training views", len(world), len(scene.i_train))
    else:
        needs_probe = args.mesh_threshold is None or (args.mesh_bbox is None and ndc)
        probe_pts = torch.zeros(0, 3, device=device)
        if needs_probe:
            probe_pts, _ = render_surface(scene, scene.poses[scene.i_train], render_kwargs, ndc,
                                          probe_stride(scene), args.chunk, device)
        if args.mesh_bbox is None:
            lo, hi = default_bbox(scene, ndc, probe_pts)
        else:
            lo, hi = np.array(args.mesh_bbox[:3]), np.array(args.mesh_bbox[3:])
        if args.mesh_threshold is None:
            level = default_threshold(probe_pts, render_kwargs, args.netchunk)
            log.info("density threshold %.6g (%g x the median density where %d training rays stop)",
                     level, SURFACE_LEVEL_FRACTION, probe_pts.shape[0])
        else:
            level = args.mesh_threshold
            log.info("density threshold %.6g", level)
        mesh = extract_mesh(trimesh, measure, scene, render_kwargs, ndc, lo, hi, level, args.mesh_resolution,
                            args.keep_largest_component, args.netchunk, args.chunk, device)
        path = run_folder.keep_earlier(expdir / f"mesh_{step:06d}.{args.mesh_format}")
        write_geometry(path, mesh)
        log.info("%d vertices, %d faces", len(mesh.vertices), len(mesh.faces))
    print(path)
    return 0


def write_geometry(path: Path, geometry_) -> None:
    """A trimesh mesh or point cloud, its format from the extension, encoded in
    memory and written whole or not at all (WriteError when the OS refuses)."""
    data = geometry_.export(file_type=path.suffix[1:])
    outputs.write_bytes(path, data.encode() if isinstance(data, str) else data)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep_freed_memory()
    return exit_status(extract, argv)


if __name__ == "__main__":
    sys.exit(main())
