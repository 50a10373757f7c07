"""Built-in demo scene: a small Blender-format dataset rendered analytically.

`configs/demo.txt` trains on `./data/demo`, which nobody has to download: the
scene is ray cast here, in pure numpy, from a few coloured solids (a red sphere,
a green box with a yellow ball on top and a blue cylinder) with Lambertian
shading (one directional light plus ambient) on a transparent background.

The output is exactly the layout `load_blender_data` reads (SPEC.md section 5):
`transforms_{train,val,test}.json` with `camera_angle_x` and frames holding a
`file_path` without ".png" and a 4x4 camera-to-world `transform_matrix`
(OpenGL axes: x right, y up, camera looking down -z; world z up), plus 8-bit RGBA
PNGs in `train/`, `val/` and `test/`.

Every pixel is shaded along the very ray the NeRF code builds for it
(SPEC.md section 4): pixel (i, j), i the column and j the row, no half-pixel
offset, direction ((i - W/2)/f, -(j - H/2)/f, -1) rotated by c2w[:3, :3],
origin c2w[:3, 3], f = .5 W / tan(.5 camera_angle_x). Antialiasing takes 2x2
sub-rays placed symmetrically around that ray (+-1/4 pixel), so the pixel's
footprint is centred on it.

Usage: `python -m nerf.demo_scene [outdir] [--force] [--layout deepvoxels|LINEMOD]`,
or from Python `ensure_demo_scene("./data/demo")` (writes only when the scene is
missing). `write_deepvoxels_layout` and `write_linemod_layout` write a Blender-layout
scene again in the layouts of the original's other two loaders.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import imageio.v2 as imageio
import numpy as np

from nerf.errors import DataError

# Defaults: lego's field of view and the Blender camera distance; images small
# enough that a tiny NeRF trains on them in minutes on a CPU.
CAMERA_ANGLE_X = 0.6911112070083618
RADIUS = 4.0
H_DEFAULT = W_DEFAULT = 80
N_TRAIN, N_VAL, N_TEST = 100, 8, 8
SEED = 0
SPLITS = ("train", "val", "test")

# Every solid lies inside this ball around the origin (checked by a test), so
# rays passing farther from the origin are background.
SCENE_RADIUS = 1.2

# Lighting: direction *towards* the light (from above, front right), ambient term.
LIGHT_DIR = np.array([0.45, -0.35, 0.82]) / np.linalg.norm([0.45, -0.35, 0.82])
AMBIENT = 0.35

_EPS = 1e-6  # smallest accepted hit distance


@dataclass(frozen=True)
class Sphere:
    center: tuple
    radius: float
    albedo: tuple


@dataclass(frozen=True)
class Box:
    """Axis-aligned box given by its centre and half extents."""
    center: tuple
    half: tuple
    albedo: tuple


@dataclass(frozen=True)
class Cylinder:
    """Closed cylinder with a vertical (world z) axis through (cx, cy)."""
    center_xy: tuple
    radius: float
    z_min: float
    z_max: float
    albedo: tuple


# All solids stand on the plane z = -0.5 (the yellow ball sits on the box) and
# the others do not touch each other. The box contains the origin, so every camera that
# looks at the origin sees an object in its centre pixel.
SCENE = (
    Box(center=(0.0, 0.0, -0.2), half=(0.3, 0.3, 0.3), albedo=(0.10, 0.80, 0.15)),
    Sphere(center=(0.65, -0.5, -0.15), radius=0.35, albedo=(0.90, 0.10, 0.10)),
    Cylinder(center_xy=(-0.5, 0.55), radius=0.28, z_min=-0.5, z_max=0.6,
             albedo=(0.15, 0.25, 0.95)),
    Sphere(center=(0.0, 0.0, 0.3), radius=0.2, albedo=(0.95, 0.80, 0.10)),
)


# --------------------------------------------------------------------------
# Ray-solid intersections. Rays: o, d of shape (N, 3); d need not be unit
# length. Each returns (t, normal): t the ray parameter of the first hit in
# front of the origin (np.inf where none), so the hit point is o + t d -- the
# same parametrisation as NeRF's z values -- and the outward unit normal there.


def _intersect_sphere(o, d, s):
    c = np.asarray(s.center, dtype=np.float64)
    oc = o - c
    a = np.sum(d * d, -1)
    b = 2.0 * np.sum(oc * d, -1)
    cc = np.sum(oc * oc, -1) - s.radius ** 2
    disc = b * b - 4 * a * cc
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    t0 = (-b - sq) / (2 * a)
    t1 = (-b + sq) / (2 * a)
    t = np.where(t0 > _EPS, t0, t1)  # t1 only matters for a ray starting inside
    t = np.where(ok & (t > _EPS), t, np.inf)
    n = (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - c) / s.radius
    return t, n


def _intersect_box(o, d, b):
    c = np.asarray(b.center, dtype=np.float64)
    h = np.asarray(b.half, dtype=np.float64)
    # Slab method; a zero direction component becomes a tiny one of the same
    # sign convention so that the division stays finite and ordered.
    dd = np.where(d == 0, 1e-30, d)
    ta = (c - h - o) / dd
    tb = (c + h - o) / dd
    t_near = np.max(np.minimum(ta, tb), -1)
    t_far = np.min(np.maximum(ta, tb), -1)
    hit = (t_near <= t_far) & (t_far > _EPS)
    t = np.where(t_near > _EPS, t_near, t_far)
    t = np.where(hit, t, np.inf)
    p = o + np.where(hit, t, 0.0)[:, None] * d
    q = (p - c) / h
    axis = np.argmax(np.abs(q), -1)
    n = np.zeros_like(o)
    rows = np.arange(len(o))
    n[rows, axis] = np.sign(q[rows, axis])
    return t, n


def _intersect_cylinder(o, d, cyl):
    cx, cy = cyl.center_xy
    ox, oy = o[:, 0] - cx, o[:, 1] - cy
    dx, dy = d[:, 0], d[:, 1]
    cands = []
    # Side: nearer root of the infinite cylinder, kept where z is in range.
    a = dx * dx + dy * dy
    b = 2 * (ox * dx + oy * dy)
    cc = ox * ox + oy * oy - cyl.radius ** 2
    disc = b * b - 4 * a * cc
    ok = (disc >= 0) & (a > 0)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    a_safe = np.where(a > 0, a, 1.0)
    for root in ((-b - sq) / (2 * a_safe), (-b + sq) / (2 * a_safe)):
        z = o[:, 2] + root * d[:, 2]
        valid = ok & (root > _EPS) & (z >= cyl.z_min) & (z <= cyl.z_max)
        cands.append(np.where(valid, root, np.inf))
    # Caps.
    dz = np.where(d[:, 2] == 0, 1e-30, d[:, 2])
    for zc in (cyl.z_min, cyl.z_max):
        tc = (zc - o[:, 2]) / dz
        x, y = ox + tc * dx, oy + tc * dy
        valid = (tc > _EPS) & (x * x + y * y <= cyl.radius ** 2)
        cands.append(np.where(valid, tc, np.inf))
    cands = np.stack(cands, -1)
    which = np.argmin(cands, -1)
    t = cands[np.arange(len(o)), which]
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    n = np.zeros_like(o)
    side = which < 2
    n[side, 0] = (p[side, 0] - cx) / cyl.radius
    n[side, 1] = (p[side, 1] - cy) / cyl.radius
    n[which == 2, 2] = -1.0
    n[which == 3, 2] = 1.0
    return t, n


_INTERSECT = {Sphere: _intersect_sphere, Box: _intersect_box, Cylinder: _intersect_cylinder}


def cast_rays(rays_o, rays_d, scene=SCENE):
    """Nearest hit of each ray with the scene.

    rays_o, rays_d: arrays (..., 3). Returns (t, normal, index): t (...) the ray
    parameter of the hit (np.inf for a miss), normal (..., 3) the unit outward
    normal there, index (...) the solid's position in `scene` (-1 for a miss).
    """
    o = np.asarray(rays_o, dtype=np.float64)
    d = np.asarray(rays_d, dtype=np.float64)
    shape = np.broadcast_shapes(o.shape, d.shape)[:-1]
    o = np.broadcast_to(o, shape + (3,)).reshape(-1, 3)
    d = np.broadcast_to(d, shape + (3,)).reshape(-1, 3)
    t_best = np.full(len(o), np.inf)
    n_best = np.zeros((len(o), 3))
    idx = np.full(len(o), -1)
    for k, solid in enumerate(scene):
        t, n = _INTERSECT[type(solid)](o, d, solid)
        closer = t < t_best
        t_best[closer] = t[closer]
        n_best[closer] = n[closer]
        idx[closer] = k
    return t_best.reshape(shape), n_best.reshape(shape + (3,)), idx.reshape(shape)


def shade(normal, index, scene=SCENE):
    """Lambertian colour: albedo * (AMBIENT + (1 - AMBIENT) * max(0, n . L)); 0 for misses."""
    albedo = np.array([s.albedo for s in scene] + [(0.0, 0.0, 0.0)])
    lambert = np.clip(np.sum(normal * LIGHT_DIR, -1), 0.0, None)
    return albedo[index] * (AMBIENT + (1 - AMBIENT) * lambert)[..., None]


def render_rays(rays_o, rays_d, scene=SCENE):
    """Colour (..., 3) in [0, 1], coverage (...) bool and depth t (...) of each ray."""
    t, n, idx = cast_rays(rays_o, rays_d, scene)
    return shade(n, idx, scene), idx >= 0, t



def _distance_sphere(p, s):
    return np.linalg.norm(p - np.asarray(s.center), axis=-1) - s.radius


def _distance_box(p, b):
    q = np.abs(p - np.asarray(b.center)) - np.asarray(b.half)
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(np.max(q, -1), 0.0)


def _distance_cylinder(p, cyl):
    radial = np.hypot(p[..., 0] - cyl.center_xy[0], p[..., 1] - cyl.center_xy[1]) - cyl.radius
    axial = np.abs(p[..., 2] - 0.5 * (cyl.z_min + cyl.z_max)) - 0.5 * (cyl.z_max - cyl.z_min)
    q = np.stack([radial, axial], -1)
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(np.max(q, -1), 0.0)


_DISTANCE = {Sphere: _distance_sphere, Box: _distance_box, Cylinder: _distance_cylinder}


def signed_distance(points, scene=SCENE):
    """Exact signed distance (...) from points (..., 3) to the nearest solid's surface
    (negative inside), and the index (...) of that solid in `scene`."""
    p = np.asarray(points, dtype=np.float64)
    d = np.stack([_DISTANCE[type(s)](p, s) for s in scene], -1)
    return np.min(d, -1), np.argmin(d, -1)

# --------------------------------------------------------------------------
# Cameras.


def focal_from_angle(W, camera_angle_x):
    return 0.5 * W / np.tan(0.5 * camera_angle_x)


def pixel_rays(H, W, focal, c2w, offset=(0.0, 0.0)):
    """Rays of all pixels, (H, W, 3) origins and directions, NeRF's convention.

    `offset` (di, dj) shifts the sample point within each pixel, in pixels
    (column, row); (0, 0) is exactly NeRF's ray.
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    i, j = np.meshgrid(np.arange(W, dtype=np.float64) + offset[0],
                       np.arange(H, dtype=np.float64) + offset[1], indexing="xy")
    dirs = np.stack([(i - W * 0.5) / focal, -(j - H * 0.5) / focal, -np.ones_like(i)], -1)
    rays_d = dirs @ c2w[:3, :3].T
    rays_o = np.broadcast_to(c2w[:3, 3], rays_d.shape)
    return rays_o, rays_d


def look_at(position, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """Camera-to-world 4x4 (OpenGL axes) of a camera at `position` looking at `target`."""
    position = np.asarray(position, dtype=np.float64)
    back = position - np.asarray(target, dtype=np.float64)
    back /= np.linalg.norm(back)
    right = np.cross(np.asarray(up, dtype=np.float64), back)
    right /= np.linalg.norm(right)
    cam_up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, back, position
    return c2w


def hemisphere_poses(n, rng, radius=RADIUS, min_elev_deg=5.0, max_elev_deg=85.0):
    """`n` cameras uniform (by area) on a band of the upper hemisphere, looking at the origin."""
    z = rng.uniform(np.sin(np.radians(min_elev_deg)), np.sin(np.radians(max_elev_deg)), n)
    phi = rng.uniform(-np.pi, np.pi, n)
    r_xy = np.sqrt(1 - z * z)
    pos = radius * np.stack([r_xy * np.cos(phi), r_xy * np.sin(phi), z], -1)
    return [look_at(p) for p in pos]


def render_view(H, W, focal, c2w, supersample=2, scene=SCENE):
    """One RGBA uint8 image (H, W, 4).

    supersample s takes s x s sub-rays per pixel at offsets symmetric around
    the pixel's NeRF ray. Colour is stored straight (not premultiplied): the
    mean colour of the covered sub-rays, alpha their fraction, so that
    `rgb * a + (1 - a)` is the white-background composite of the sub-rays.
    """
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    premult = np.zeros((H, W, 3))
    cover = np.zeros((H, W))
    for dj in offs:
        for di in offs:
            o, d = pixel_rays(H, W, focal, c2w, (di, dj))
            rgb, hit, _ = render_rays(o, d, scene)
            premult += rgb * hit[..., None]
            cover += hit
    alpha = cover / supersample ** 2
    rgb = premult / np.maximum(cover, 1)[..., None]
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    return np.round(np.clip(rgba, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Writing the dataset.


def make_demo_scene(outdir, H=H_DEFAULT, W=W_DEFAULT, n_train=N_TRAIN, n_val=N_VAL,
                    n_test=N_TEST, camera_angle_x=CAMERA_ANGLE_X, radius=RADIUS,
                    seed=SEED, supersample=2):
    """Render the demo scene into `outdir` (created; existing files overwritten).

    Train, val and test cameras are drawn from separate seeded streams, so the
    held-out views never coincide with training views. Returns `outdir`.
    """
    focal = focal_from_angle(W, camera_angle_x)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    os.makedirs(outdir, exist_ok=True)
    for split, ss in zip(SPLITS, streams):
        poses = hemisphere_poses(counts[split], np.random.default_rng(ss), radius)
        os.makedirs(os.path.join(outdir, split), exist_ok=True)
        frames = []
        for k, c2w in enumerate(poses):
            name = f"./{split}/r_{k}"
            img = render_view(H, W, focal, c2w, supersample)
            imageio.imwrite(os.path.join(outdir, name + ".png"), img)
            frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
        meta = {"camera_angle_x": camera_angle_x, "frames": frames}
        with open(os.path.join(outdir, f"transforms_{split}.json"), "w") as f:
            json.dump(meta, f, indent=4)
    return outdir


def is_complete(outdir):
    """True when all three transforms files parse and every image they name exists."""
    try:
        for split in SPLITS:
            with open(os.path.join(outdir, f"transforms_{split}.json")) as f:
                meta = json.load(f)
            if not meta["frames"]:
                return False
            for frame in meta["frames"]:
                if not os.path.isfile(os.path.join(outdir, frame["file_path"] + ".png")):
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def ensure_demo_scene(outdir="./data/demo", verbose=True, **kwargs):
    """Write the demo scene to `outdir` unless a complete one is already there.

    The scene is written into a temporary sibling folder and renamed into
    place, so an interrupted run never leaves a folder that passes for a
    complete scene. A non-empty folder at `outdir` that is not a complete
    scene is someone's data: it is left alone and DataError says so.
    Keyword arguments go to `make_demo_scene` (they only matter when the
    scene is written). Returns `outdir`.
    """
    outdir = os.path.normpath(outdir)
    if is_complete(outdir):
        return outdir
    if os.path.isdir(outdir) and not os.listdir(outdir):
        os.rmdir(outdir)
    if os.path.lexists(outdir):
        raise DataError(outdir, "exists but is not a complete demo scene; move it away or choose another --datadir")
    parent = os.path.dirname(os.path.abspath(outdir))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(outdir)
    if verbose:
        print(f"Writing the built-in demo scene to {outdir}", flush=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    try:
        make_demo_scene(tmp, **kwargs)
        try:
            os.rename(tmp, outdir)
        except OSError:
            # Another process finished first; keep its scene if it is whole.
            if not is_complete(outdir):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return outdir


# --------------------------------------------------------------------------
# The same scene in the layouts of the original's other loaders.

# DeepVoxels' ray bounds are the mean camera distance -1 and +1 (SPEC.md section 4): its
# scenes fit in a unit ball. Scaling the whole world (cameras included) leaves every
# image as it is; this factor puts the demo's solids (radius SCENE_RADIUS) inside the bounds.
DEEPVOXELS_WORLD_SCALE = 0.75
DEEPVOXELS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
LINEMOD_NEAR, LINEMOD_FAR = 2.0, 6.0    # the Blender loader's bounds, which hold the demo's solids


def _blender_frames(blender_dir, split):
    """(frames of transforms_<split>.json, focal) of a Blender-layout folder."""
    with open(os.path.join(blender_dir, f"transforms_{split}.json")) as f:
        meta = json.load(f)
    first = imageio.imread(os.path.join(blender_dir, meta["frames"][0]["file_path"] + ".png"))
    return meta["frames"], focal_from_angle(first.shape[1], meta["camera_angle_x"])


def write_deepvoxels_layout(blender_dir, basedir, scene="demo", world_scale=DEEPVOXELS_WORLD_SCALE):
    """The Blender-layout scene in `blender_dir` again in DeepVoxels' layout, as
    `load_dv_data(scene, basedir)` reads it: `{train,validation,test}/<scene>/`
    each with `intrinsics.txt` (`f cx cy 0`, the grid barycentre, near plane,
    scale, `height width`), `pose/<k:06d>.txt` (16 numbers, a camera-to-world
    matrix in OpenCV axes: y down, z forward) and `rgb/<k:06d>.png` (RGB,
    composited on white like DeepVoxels' renders). Positions are multiplied by
    `world_scale`. Returns `basedir`."""
    for split, dv_split in DEEPVOXELS_SPLITS.items():
        frames, focal = _blender_frames(blender_dir, split)
        folder = os.path.join(basedir, dv_split, scene)
        os.makedirs(os.path.join(folder, "rgb"), exist_ok=True)
        os.makedirs(os.path.join(folder, "pose"), exist_ok=True)
        for k, frame in enumerate(frames):
            rgba = imageio.imread(os.path.join(blender_dir, frame["file_path"] + ".png")).astype(np.float64) / 255
            rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
            imageio.imwrite(os.path.join(folder, "rgb", f"{k:06d}.png"), np.round(rgb * 255).astype(np.uint8))
            c2w = np.array(frame["transform_matrix"], dtype=np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])
            c2w[:3, 3] *= world_scale
            with open(os.path.join(folder, "pose", f"{k:06d}.txt"), "w") as f:
                f.write(" ".join(repr(float(v)) for v in c2w.ravel()) + "\n")
        H, W = rgba.shape[:2]
        with open(os.path.join(folder, "intrinsics.txt"), "w") as f:
            f.write(f"{float(focal)!r} {W / 2!r} {H / 2!r} 0.\n0. 0. 0.\n0.\n1.\n{H} {W}\n")
    return basedir


def write_linemod_layout(blender_dir, outdir, near=LINEMOD_NEAR, far=LINEMOD_FAR):
    """The Blender-layout scene in `blender_dir` again in the LINEMOD layout, as
    `load_LINEMOD_data(outdir)` reads it: `transforms_{train,val,test}.json` with
    `near`, `far` and frames holding `file_path` (with its extension, relative to
    `outdir`), `transform_matrix` and `intrinsic_matrix` (3x3, principal point
    at the image centre), beside the same RGBA PNGs. Returns `outdir`."""
    for split in SPLITS:
        frames, focal = _blender_frames(blender_dir, split)
        os.makedirs(os.path.join(outdir, split), exist_ok=True)
        out = []
        for frame in frames:
            name = frame["file_path"] + ".png"
            shutil.copyfile(os.path.join(blender_dir, name), os.path.join(outdir, name))
            H, W = imageio.imread(os.path.join(outdir, name)).shape[:2]
            K = [[float(focal), 0.0, W / 2], [0.0, float(focal), H / 2], [0.0, 0.0, 1.0]]
            out.append({"file_path": name, "transform_matrix": frame["transform_matrix"], "intrinsic_matrix": K})
        with open(os.path.join(outdir, f"transforms_{split}.json"), "w") as f:
            json.dump({"near": near, "far": far, "frames": out}, f, indent=4)
    return outdir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", nargs="?", default="./data/demo")
    p.add_argument("--force", action="store_true", help="rewrite even if present")
    p.add_argument("--H", type=int, default=H_DEFAULT)
    p.add_argument("--W", type=int, default=W_DEFAULT)
    p.add_argument("--layout", choices=("blender", "deepvoxels", "LINEMOD"), default="blender",
                   help="deepvoxels: outdir/{train,validation,test}/demo (--dataset_type deepvoxels --shape demo); "
                        "LINEMOD: transforms files with intrinsics and bounds (--dataset_type LINEMOD)")
    args = p.parse_args(argv)
    if args.force and os.path.isdir(args.outdir):
        shutil.rmtree(args.outdir)
    if args.layout == "blender":
        ensure_demo_scene(args.outdir, H=args.H, W=args.W)
        return 0
    with tempfile.TemporaryDirectory() as blender_dir:
        make_demo_scene(blender_dir, H=args.H, W=args.W)
        write = write_deepvoxels_layout if args.layout == "deepvoxels" else write_linemod_layout
        write(blender_dir, args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
