"""LLFF forward-facing scenes: `poses_bounds.npy` plus photos in `images*/`.

Each row of poses_bounds.npy holds a 3x5 matrix (camera-to-world rotation
with columns down, right, back; camera centre; [H, W, focal]) flattened by
rows, then the near and far depth bounds. The loader reorders the rotation
to (right, up, back), rescales the scene so the nearest bound sits at
1/bd_factor, recentres the poses on their average and builds the render path.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import imageio.v3 as iio
import numpy as np
from PIL import Image

from nerf.errors import DataError

IMAGE_EXTS = (".JPG", ".jpg", ".png")
POSES_NAMES = "poses_names.txt"


def list_images(folder: Path) -> List[Path]:
    """The images of a folder, in sorted file-name order."""
    return [folder / f for f in sorted(os.listdir(folder)) if f.endswith(IMAGE_EXTS)]


def _minify(basedir: Path, factor: int) -> Path:
    """Makes `images_<factor>/` from `images/` (Lanczos, PNG) unless it exists.

    Written to a temporary folder and renamed, so an interrupted run never
    leaves a half-filled folder behind.
    """
    target = basedir / f"images_{factor}"
    if target.is_dir():
        return target
    source = basedir / "images"
    if not source.is_dir():
        raise DataError(source, f"missing (needed to make images_{factor}/)")
    tmp = Path(tempfile.mkdtemp(prefix=f".images_{factor}_", dir=basedir))
    try:
        for path in list_images(source):
            with Image.open(path) as img:
                img = img.convert("RGB")
                size = (max(1, round(img.width / factor)), max(1, round(img.height / factor)))
                img.resize(size, Image.LANCZOS).save(tmp / (path.stem + ".png"))
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _select_registered(basedir: Path, imgfiles: List[Path]) -> List[Path]:
    """With `poses_names.txt` (written by imgs2poses.py when some photos did not
    register), keeps the images named there, in that order. Names refer to
    `images/`; a downsampled folder pairs with it by sorted position."""
    names_file = basedir / POSES_NAMES
    if not names_file.exists():
        return imgfiles
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    originals = [p.name for p in list_images(basedir / "images")] if (basedir / "images").is_dir() \
        else [p.name for p in imgfiles]
    if len(originals) != len(imgfiles):
        raise DataError(imgfiles[0].parent if imgfiles else basedir,
                        f"{len(imgfiles)} images but images/ has {len(originals)}")
    index = {name: k for k, name in enumerate(originals)}
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(names_file, f"names images that do not exist: {', '.join(missing[:3])}")
    return [imgfiles[index[n]] for n in names]


def eight_bit_colours(values: np.ndarray) -> np.ndarray:
    """The colours in [0, 1] of values read from image files, as the original
    makes them: values / 255 in float64, rounded to float32 (any shape)."""
    return (values / 255.0).astype(np.float32)


def _load_data(basedir, factor: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads poses (3, 5, N), bounds (2, N) and the images' values as read
    (N, H, W, 3), uint8 for 8-bit files (`eight_bit_colours` makes them colours).
    H, W come from the images read; the focal is divided by `factor`."""
    basedir = Path(basedir)
    poses_file = basedir / "poses_bounds.npy"
    if not poses_file.exists():
        raise DataError(poses_file, "missing")
    poses_arr = np.load(poses_file)
    if poses_arr.ndim != 2 or poses_arr.shape[1] != 17:
        raise DataError(poses_file, f"has shape {poses_arr.shape}, expected N x 17")
    poses = poses_arr[:, :-2].reshape([-1, 3, 5]).transpose([1, 2, 0])
    bds = poses_arr[:, -2:].transpose([1, 0])

    imgdir = _minify(basedir, factor) if factor is not None and factor != 1 else basedir / "images"
    if not imgdir.is_dir():
        raise DataError(imgdir, "missing")
    imgfiles = _select_registered(basedir, list_images(imgdir))
    if poses.shape[-1] != len(imgfiles):
        raise DataError(poses_file, f"has {poses.shape[-1]} poses but {imgdir} has {len(imgfiles)} images")

    imgs = []
    for f in imgfiles:
        try:
            img = iio.imread(f)
        except Exception as exc:
            raise DataError(f, f"unreadable image ({exc.__class__.__name__})") from None
        if imgs and img.shape[:2] != imgs[0].shape[:2]:
            raise DataError(f, f"is {img.shape[1]}x{img.shape[0]}, the first image is "
                               f"{imgs[0].shape[1]}x{imgs[0].shape[0]}")
        imgs.append(img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, -1))
    sh = imgs[0].shape
    poses[:2, 4, :] = np.array(sh[:2]).reshape([2, 1])
    poses[2, 4, :] = poses[2, 4, :] * 1.0 / (factor or 1)
    return poses, bds, np.stack(imgs, 0)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def viewmatrix(z: np.ndarray, up: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(3, 4) camera-to-world looking along -z with the given up hint and centre."""
    vec2 = normalize(z)
    vec0 = normalize(np.cross(up, vec2))
    vec1 = normalize(np.cross(vec2, vec0))
    return np.stack([vec0, vec1, vec2, pos], 1)


def poses_avg(poses: np.ndarray) -> np.ndarray:
    """Average pose (3, 5): mean centre, normalised summed z axes, summed y axes as up."""
    hwf = poses[0, :3, -1:]
    center = poses[:, :3, 3].mean(0)
    vec2 = normalize(poses[:, :3, 2].sum(0))
    up = poses[:, :3, 1].sum(0)
    return np.concatenate([viewmatrix(vec2, up, center), hwf], 1)


def render_path_spiral(c2w: np.ndarray, up: np.ndarray, rads: Sequence[float], focal: float,
                       zdelta: float, zrate: float, rots: int, N: int) -> List[np.ndarray]:
    """N poses (3, 5) on a spiral around `c2w`, each looking at the point at
    depth `focal` in front of it."""
    render_poses = []
    rads = np.array(list(rads) + [1.0])
    hwf = c2w[:, 4:5]
    for theta in np.linspace(0.0, 2.0 * np.pi * rots, N + 1)[:-1]:
        c = np.dot(c2w[:3, :4], np.array([np.cos(theta), -np.sin(theta), -np.sin(theta * zrate), 1.0]) * rads)
        z = normalize(c - np.dot(c2w[:3, :4], np.array([0, 0, -focal, 1.0])))
        render_poses.append(np.concatenate([viewmatrix(z, up, c), hwf], 1))
    return render_poses


def _to_44(poses: np.ndarray) -> np.ndarray:
    """(N, 3, 4+) -> (N, 4, 4) homogeneous."""
    bottom = np.broadcast_to(np.array([0, 0, 0, 1.0]), (poses.shape[0], 1, 4))
    return np.concatenate([poses[:, :3, :4], bottom], -2)


def recenter_poses(poses: np.ndarray) -> np.ndarray:
    """Applies the inverse of the average pose to every pose (N, 3, 5)."""
    poses_ = poses + 0
    c2w = _to_44(poses_avg(poses)[None])[0]
    poses_[:, :3, :4] = (np.linalg.inv(c2w) @ _to_44(poses))[:, :3, :4]
    return poses_


def spherify_poses(poses: np.ndarray, bds: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For inward-facing 360 captures: centres the scene on the point closest to
    all optical axes, scales the cameras to unit mean radius and puts 120
    render poses on a circle at their mean height. Returns (poses, render_poses, bds)."""
    rays_d = poses[:, :3, 2:3]
    rays_o = poses[:, :3, 3:4]
    A_i = np.eye(3) - rays_d * np.transpose(rays_d, [0, 2, 1])
    b_i = -A_i @ rays_o
    center = np.squeeze(-np.linalg.inv((np.transpose(A_i, [0, 2, 1]) @ A_i).mean(0)) @ b_i.mean(0))

    vec0 = normalize((poses[:, :3, 3] - center).mean(0))
    vec1 = normalize(np.cross([0.1, 0.2, 0.3], vec0))
    vec2 = normalize(np.cross(vec0, vec1))
    c2w = np.stack([vec1, vec2, vec0, center], 1)
    poses_reset = np.linalg.inv(_to_44(c2w[None])) @ _to_44(poses)

    rad = np.sqrt(np.mean(np.sum(np.square(poses_reset[:, :3, 3]), -1)))
    sc = 1.0 / rad
    poses_reset[:, :3, 3] *= sc
    bds = bds * sc
    rad *= sc

    zh = np.mean(poses_reset[:, :3, 3], 0)[2]
    radcircle = np.sqrt(rad ** 2 - zh ** 2)
    new_poses = []
    for th in np.linspace(0.0, 2.0 * np.pi, 120):
        camorigin = np.array([radcircle * np.cos(th), radcircle * np.sin(th), zh])
        vec2 = normalize(camorigin)
        vec0 = normalize(np.cross(vec2, np.array([0, 0, -1.0])))
        vec1 = normalize(np.cross(vec2, vec0))
        new_poses.append(np.stack([vec0, vec1, vec2, camorigin], 1))
    new_poses = np.stack(new_poses, 0)

    hwf = poses[0, :3, -1:]
    new_poses = np.concatenate([new_poses, np.broadcast_to(hwf, new_poses[:, :3, -1:].shape)], -1)
    poses_reset = np.concatenate([poses_reset[:, :3, :4],
                                  np.broadcast_to(hwf, poses_reset[:, :3, -1:].shape)], -1)
    return poses_reset, new_poses, bds


def load_llff_data(basedir, factor: int = 8, recenter: bool = True, bd_factor: float = .75,
                   spherify: bool = False, path_zflat: bool = False, eight_bit: bool = False):
    """Loads an LLFF scene.

    Returns images (N, H, W, 3) float32 in [0, 1] (with `eight_bit` and 8-bit
    files, their uint8 values instead, a quarter of the memory; their colours
    are `eight_bit_colours(images)`), poses (N, 3, 5) float32
    (rotation columns right, up, back; centre; [H, W, focal]), bds (N, 2),
    render_poses (120, 3, 5) (60 with path_zflat) and i_test, the index of
    the view nearest the average pose.
    """
    poses, bds, values = _load_data(basedir, factor=factor)
    if eight_bit and values.dtype == np.uint8:
        images = values
    else:
        images = np.empty(values.shape, np.float32)       # one image at a time: no float64 copy of them all
        for k, img in enumerate(values):
            images[k] = eight_bit_colours(img)
    del values

    poses = np.concatenate([poses[:, 1:2, :], -poses[:, 0:1, :], poses[:, 2:, :]], 1)
    poses = np.moveaxis(poses, -1, 0).astype(np.float32)
    bds = np.moveaxis(bds, -1, 0).astype(np.float32)

    sc = 1.0 if bd_factor is None else 1.0 / (bds.min() * bd_factor)
    poses[:, :3, 3] *= sc
    bds *= sc

    if recenter:
        poses = recenter_poses(poses)

    if spherify:
        poses, render_poses, bds = spherify_poses(poses, bds)
    else:
        c2w = poses_avg(poses)
        up = normalize(poses[:, :3, 1].sum(0))
        close_depth, inf_depth = bds.min() * .9, bds.max() * 5.0
        dt = .75
        focal = 1.0 / ((1.0 - dt) / close_depth + dt / inf_depth)
        zdelta = close_depth * .2
        rads = np.percentile(np.abs(poses[:, :3, 3]), 90, 0)
        c2w_path = c2w.copy()
        N_views, N_rots = 120, 2
        if path_zflat:
            c2w_path[:3, 3] = c2w_path[:3, 3] + (-close_depth * .1) * c2w_path[:3, 2]
            rads[2] = 0.0
            N_rots = 1
            N_views //= 2
        render_poses = render_path_spiral(c2w_path, up, rads, focal, zdelta, zrate=.5, rots=N_rots, N=N_views)

    render_poses = np.array(render_poses).astype(np.float32)
    c2w = poses_avg(poses)
    dists = np.sum(np.square(c2w[:3, 3] - poses[:, :3, 3]), -1)
    i_test = int(np.argmin(dists))
    return images, poses.astype(np.float32), bds.astype(np.float32), render_poses, i_test
