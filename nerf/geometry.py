"""World-space geometry of a trained NeRF: NDC and back, depth along the
viewing axis, where the rays stop, and the region the cameras see.

Pure functions on torch tensors (no extra dependencies: `--render_only`
uses them for its depth maps, extract_mesh.py for meshes and point clouds).

"Render space" is where the network was trained and the rays are sampled:
world coordinates, or for forward-facing scenes (LLFF without --no_ndc)
normalised device coordinates, NDC, as `ndc_rays` defines them with near = 1:

    x' = -fx/(W/2) x/z + (2 cx/W - 1),   y' = -fy/(H/2) y/z + (1 - 2 cy/H),   z' = 1 + 2 near / z,

z' = -1 on the plane z = -near and z' -> 1 as z -> -infinity (the NDC far
plane is at infinity). `hwf` below is (H, W, focal) or (H, W, K): a focal
means the original's centred camera (fx = fy = focal, cx = W/2, cy = H/2).
"""
from typing import List, Optional, Tuple

import numpy as np
import torch

import run_nerf_helpers as helpers     # get_rays, ndc_rays looked up at call time: a fork may replace them
from run_nerf_helpers import ndc_intrinsics

NDC_NEAR = 1.0   # render() calls ndc_rays with near = 1


def world_to_ndc(pts: torch.Tensor, H: int, W: int, focal, near: float = NDC_NEAR) -> torch.Tensor:
    """World points (..., 3), z < 0, to NDC (..., 3): the mapping `ndc_rays` applies to every point of a ray.
    focal: a number or the 3x3 K (see `ndc_rays`)."""
    fx, fy, cx, cy = ndc_intrinsics(H, W, focal)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    return torch.stack([-fx / (W / 2.0) * x / z + (2.0 * cx / W - 1.0),
                        -fy / (H / 2.0) * y / z + (1.0 - 2.0 * cy / H), 1.0 + 2.0 * near / z], -1)


def ndc_to_world(pts: torch.Tensor, H: int, W: int, focal, near: float = NDC_NEAR) -> torch.Tensor:
    """NDC points (..., 3), z' < 1, back to world (..., 3), the inverse of `world_to_ndc`:
    z = 2 near / (z' - 1), x = -(x' - 2 cx/W + 1) z (W/2)/fx, y = -(y' - 1 + 2 cy/H) z (H/2)/fy."""
    fx, fy, cx, cy = ndc_intrinsics(H, W, focal)
    z = 2.0 * near / (pts[..., 2] - 1.0)
    return torch.stack([-(pts[..., 0] - (2.0 * cx / W - 1.0)) * z * (W / 2.0) / fx,
                        -(pts[..., 1] - (1.0 - 2.0 * cy / H)) * z * (H / 2.0) / fy, z], -1)


def to_world(pts: torch.Tensor, ndc: bool, hwf) -> torch.Tensor:
    """Render-space points (..., 3) in world coordinates (unchanged unless `ndc`)."""
    H, W, focal = hwf
    return ndc_to_world(pts, int(H), int(W), focal) if ndc else pts


def ndc_camera(H: int, W: int, K):
    """What `render` passes to `ndc_rays` as its `focal`: the focal length itself
    for a centred camera with fx = fy (the original's call, so that a fork's
    ndc_rays of the original's signature keeps working), else the 3x3 K."""
    fx, fy, cx, cy = ndc_intrinsics(H, W, K)
    return fx if (fy, cx, cy) == (fx, W / 2.0, H / 2.0) else K


def render_space_rays(rays_o: torch.Tensor, rays_d: torch.Tensor, ndc: bool,
                      hwf) -> Tuple[torch.Tensor, torch.Tensor]:
    """World rays (..., 3) as `render` samples them: through `ndc_rays` (near 1) when `ndc`."""
    H, W, focal = hwf
    if not ndc:
        return rays_o, rays_d
    return helpers.ndc_rays(int(H), int(W), ndc_camera(int(H), int(W), focal), NDC_NEAR, rays_o, rays_d)


def termination_points(disp: torch.Tensor, acc: torch.Tensor, rays_o: torch.Tensor,
                       rays_d: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Where render-space rays (rays_o, rays_d (..., 3)) stop: o + t d, by default
    at t = sum_i w_i t_i / sum_i w_i, the ray's weighted mean sample depth, or
    at the given ray parameters t (...) (e.g. `rendering.median_termination`).

    raw2outputs gives disp = 1 / max(1e-10, mean t) (..., ) and acc = sum_i w_i,
    so the mean t = 1 / disp. Returns (..., 3), NaN where acc is 0 (the ray hit nothing).
    """
    t = 1.0 / disp if t is None else t
    t = torch.where(acc > 0, t, torch.full_like(disp, float('nan')))
    return rays_o + t[..., None] * rays_d


def view_depth(pts: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """Depth (...) of world points (..., 3) along the camera's viewing axis -c2w[:3, 2],
    measured from its centre c2w[:3, 3]: (p - o) . (-c2w[:3, 2])."""
    return torch.sum((pts - c2w[:3, 3]) * -c2w[:3, 2], -1)


def depth_map(disp: torch.Tensor, acc: torch.Tensor, c2w: torch.Tensor, K, ndc: bool,
              min_acc: float = 0.5, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A rendered view's depth (H, W) in world units along the viewing axis, from its
    disp and acc maps (H, W) rendered by `render` with intrinsics K from camera c2w (3, 4);
    NaN where acc < min_acc. The point taken on each ray is its mean termination point,
    or the one at the render-space ray parameters t (H, W) when given (the median:
    quantiles, unlike the mean, keep their meaning through NDC's monotone depth mapping).
    For NDC scenes the NDC point goes back to world first (with render's NDC mapping:
    this H, W and K). Without NDC the pixel ray's direction has viewing-axis
    component 1, so the depth is the ray depth t itself."""
    H, W = disp.shape
    hwf = (H, W, K)
    rays_o, rays_d = helpers.get_rays(H, W, K, c2w)
    pts = to_world(termination_points(disp, acc, *render_space_rays(rays_o, rays_d, ndc, hwf), t), ndc, hwf)
    depth = view_depth(pts, c2w)
    return torch.where(acc >= min_acc, depth, torch.full_like(depth, float('nan')))


def project(pts: torch.Tensor, c2w: torch.Tensor, K) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points (P, 3) into a camera (c2w (3, 4), K (3, 3)), with the rays' convention
    (pixel (i, j) looks along ((i - cx)/fx, -(j - cy)/fy, -1)). Returns the column i,
    the row j and the depth along the viewing axis (the ray parameter t), each (P,)."""
    K = torch.as_tensor(K, dtype=pts.dtype, device=pts.device)
    cam = (pts - c2w[:3, 3]) @ c2w[:3, :3]        # camera axes: right, up, back
    depth = -cam[:, 2]
    return K[0, 2] + K[0, 0] * cam[:, 0] / depth, K[1, 2] - K[1, 1] * cam[:, 1] / depth, depth


def seen_by_all(pts: torch.Tensor, poses: torch.Tensor, K, H: int, W: int, near: float, far: float,
                ndc: bool, hwf) -> torch.Tensor:
    """Whether each render-space point (P, 3) is seen by every camera in poses (C, 3, 4):
    inside its image and, along its viewing axis, between near and far (world scenes) or in
    front of the plane z = -1 where the NDC rays start (NDC scenes). Returns (P,) bool."""
    world = to_world(pts, ndc, hwf)
    seen = torch.ones(pts.shape[0], dtype=torch.bool, device=pts.device)
    for c2w in poses:
        i, j, depth = project(world, c2w, K)
        inside = (i >= 0) & (i <= W - 1) & (j >= 0) & (j <= H - 1) & (depth > 0)
        seen &= inside & ((world[:, 2] <= -NDC_NEAR) if ndc else ((depth >= near) & (depth <= far)))
    return seen


def box_points(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """The n^3 points (n^3, 3) of a regular lattice spanning the box [lo, hi] (each (3,))."""
    axes = [torch.linspace(float(lo[k]), float(hi[k]), n, dtype=lo.dtype, device=lo.device) for k in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3)


def seen_region(poses: torch.Tensor, K, H: int, W: int, near: float, far: float, ndc: bool, hwf,
                n: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render-space box (lo, hi, each (3,)) around the points every training camera sees
    (see `seen_by_all`), found on an n^3 lattice, then again on one within that box
    widened by a lattice step. Starts from the NDC cube [-1, 1]^3 or, in world scenes,
    from the box around the cameras and their frustums' corners at `far`.
    Returns (None, None) when no lattice point is seen by all cameras."""
    dtype = torch.float64
    poses = torch.as_tensor(poses, dtype=dtype)
    if ndc:
        lo = torch.tensor([-1.0, -1.0, -1.0], dtype=dtype)
        hi = torch.tensor([1.0, 1.0, 1.0 - 1e-3], dtype=dtype)
    else:
        corners = []
        for c2w in poses:
            rays_o, rays_d = helpers.get_rays(H, W, K, c2w)
            corners += [rays_o[0, 0], (rays_o + far * rays_d)[[0, 0, -1, -1], [0, -1, 0, -1]]]
        corners = torch.cat([c.reshape(-1, 3) for c in corners], 0)
        lo, hi = corners.min(0).values, corners.max(0).values
    for _ in range(2):
        pts = box_points(lo, hi, n)
        kept = pts[seen_by_all(pts, poses, K, H, W, near, far, ndc, hwf)]
        if kept.shape[0] == 0:
            return None, None
        step = (hi - lo) / (n - 1)
        lo, hi = torch.maximum(kept.min(0).values - step, lo), torch.minimum(kept.max(0).values + step, hi)
    return lo, hi


def grid_axes(lo: np.ndarray, hi: np.ndarray, resolution: int) -> Tuple[List[np.ndarray], float]:
    """A lattice with `resolution` cells along the box's longest side and the same cell
    size h = max(hi - lo) / resolution on every axis. Returns the three axes' coordinates
    (lo_k + h * arange(n_k), n_k = round((hi_k - lo_k) / h) + 1) and h."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    h = float(np.max(hi - lo)) / resolution
    return [lo[k] + h * np.arange(int(round((hi[k] - lo[k]) / h)) + 1) for k in range(3)], h


# Near to far: yellow, orange, magenta, blue, dark blue (a perceptually ordered ramp).
DEPTH_RAMP = np.array([[0.99, 0.91, 0.14], [0.96, 0.52, 0.10], [0.72, 0.21, 0.47], [0.25, 0.16, 0.58],
                       [0.05, 0.03, 0.20]])


def colour_depth(depths: np.ndarray) -> np.ndarray:
    """Depth maps (..., H, W) as colours (..., H, W, 3) in [0, 1] for viewing: depth from its
    1st to its 99th percentile over all maps along DEPTH_RAMP (near yellow, far dark blue);
    NaN (nothing hit) black."""
    finite = np.isfinite(depths)
    if not finite.any():
        return np.zeros(depths.shape + (3,), dtype=np.float32)
    near, far = np.percentile(depths[finite], [1, 99])
    x = np.clip((np.where(finite, depths, near) - near) / max(far - near, 1e-12), 0, 1)
    stops = np.linspace(0, 1, len(DEPTH_RAMP))
    rgb = np.stack([np.interp(x, stops, DEPTH_RAMP[:, c]) for c in range(3)], -1)
    return np.where(finite[..., None], rgb, 0.0).astype(np.float32)
