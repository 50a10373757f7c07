"""Blender synthetic scenes: `transforms_{train,val,test}.json` plus RGBA PNGs.

Each JSON holds `camera_angle_x` and frames with a `file_path` (without
".png") and a 4x4 camera-to-world `transform_matrix` (OpenGL axes).
"""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import imageio.v3 as iio
import numpy as np

from nerf.errors import DataError

SPLITS = ("train", "val", "test")


def trans_t(t: float) -> np.ndarray:
    return np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, t], [0, 0, 0, 1]], dtype=np.float32)


def rot_phi(phi: float) -> np.ndarray:
    c, s = np.cos(phi), np.sin(phi)
    return np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]], dtype=np.float32)


def rot_theta(th: float) -> np.ndarray:
    c, s = np.cos(th), np.sin(th)
    return np.array([[c, 0, -s, 0], [0, 1, 0, 0], [s, 0, c, 0], [0, 0, 0, 1]], dtype=np.float32)


def pose_spherical(theta: float, phi: float, radius: float) -> np.ndarray:
    """(4, 4) camera on a sphere of `radius` at azimuth `theta` and elevation
    `phi` (degrees), looking at the origin, z up (Blender's world)."""
    c2w = trans_t(radius)
    c2w = rot_phi(phi / 180.0 * np.pi) @ c2w
    c2w = rot_theta(theta / 180.0 * np.pi) @ c2w
    return np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32) @ c2w


def spherical_render_poses(n: int = 40) -> np.ndarray:
    """The 360 render path: n poses at elevation -30 degrees, radius 4."""
    return np.stack([pose_spherical(a, -30.0, 4.0) for a in np.linspace(-180, 180, n + 1)[:-1]], 0)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix averaging each output pixel's footprint, weighted by
    overlap (OpenCV's INTER_AREA; a plain 2x2 block mean when n_in = 2 n_out)."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0, None)
    return overlap / scale


def area_resize(img: np.ndarray, H: int, W: int) -> np.ndarray:
    """Resizes (h, w, C) to (H, W, C) by area averaging (exact block means
    when the sizes divide, overlap-weighted otherwise)."""
    h, w = img.shape[:2]
    img = img.astype(np.float32)
    if h % H == 0 and w % W == 0:
        return img.reshape(H, h // H, W, w // W, -1).mean((1, 3), dtype=np.float32)
    rows = _area_weights(h, H).astype(np.float32)
    cols = _area_weights(w, W).astype(np.float32)
    return np.einsum("Hh,hwc,Ww->HWc", rows, img, cols, optimize=True)


def read_transforms(basedir: Path, split: str) -> dict:
    """Parses and checks `transforms_<split>.json`."""
    path = Path(basedir) / f"transforms_{split}.json"
    if not path.exists():
        raise DataError(path, "missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise DataError(path, "has no 'frames' list")
    if not meta["frames"]:
        raise DataError(path, "has an empty 'frames' list")
    for k, frame in enumerate(meta["frames"]):
        if not isinstance(frame, dict) or "file_path" not in frame:
            raise DataError(path, f"frame {k} has no 'file_path'")
        if np.shape(frame.get("transform_matrix")) != (4, 4):
            raise DataError(path, f"frame {k} has no 4x4 'transform_matrix'")
    return meta


def frame_file(basedir, file_path: str, suffix: str = ".png") -> Path:
    """The image a frame names: `file_path` + `suffix` in the scene folder. A
    LINEMOD frame (no suffix) whose file is not there may name it relative to
    the working directory, as the original's LINEMOD loader read it."""
    path = Path(basedir) / (file_path + suffix)
    if not suffix and not path.exists() and Path(file_path).is_file():
        return Path(file_path)
    return path


def read_split(basedir: Path, meta: dict, skip: int, half_res: bool, suffix: str = ".png"
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Every `skip`-th frame of a split: images (n, H, W, C) in [0, 1] (halved
    by area averaging with `half_res`) and poses (n, 4, 4), float32."""
    imgs, poses = [], []
    for frame in meta["frames"][::skip]:
        fname = frame_file(basedir, frame["file_path"], suffix)
        if not fname.exists():
            raise DataError(fname, "missing (referenced by a transforms file)")
        try:
            img = iio.imread(fname).astype(np.float32) / 255.0
        except Exception as exc:
            raise DataError(fname, f"unreadable image ({exc.__class__.__name__})") from None
        if half_res:
            img = area_resize(img, img.shape[0] // 2, img.shape[1] // 2)
        if imgs and img.shape != imgs[0].shape:
            raise DataError(fname, f"has shape {img.shape}, the split's first image {imgs[0].shape}")
        imgs.append(img)
        poses.append(np.array(frame["transform_matrix"], dtype=np.float32))
    return np.stack(imgs, 0), np.stack(poses, 0)


def load_splits(basedir, testskip: int, half_res: bool, suffix: str = ".png"
                ) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray], Dict[str, dict]]:
    """Reads train, val and test (val/test keep every `testskip`-th frame).
    Returns images, poses, i_split (index arrays) and the parsed JSONs."""
    metas = {s: read_transforms(Path(basedir), s) for s in SPLITS}
    all_imgs, all_poses, counts = [], [], [0]
    for s in SPLITS:
        skip = 1 if s == "train" or testskip == 0 else testskip
        imgs, poses = read_split(Path(basedir), metas[s], skip, half_res, suffix)
        counts.append(counts[-1] + imgs.shape[0])
        all_imgs.append(imgs)
        all_poses.append(poses)
    shapes = {a.shape[1:] for a in all_imgs}
    if len(shapes) > 1:
        raise DataError(basedir, f"splits have different image shapes: {sorted(shapes)}")
    i_split = [np.arange(counts[i], counts[i + 1]) for i in range(3)]
    return np.concatenate(all_imgs, 0), np.concatenate(all_poses, 0), i_split, metas


def load_blender_data(basedir, half_res: bool = False, testskip: int = 1):
    """Returns imgs (N, H, W, 4) RGBA float32, poses (N, 4, 4), render_poses
    (40, 4, 4), [H, W, focal] and i_split [train, val, test] index arrays.
    focal = .5 W / tan(.5 camera_angle_x); half_res halves H, W and focal."""
    imgs, poses, i_split, metas = load_splits(basedir, testskip, half_res)
    H, W = imgs.shape[1:3]
    try:
        camera_angle_x = float(metas["test"]["camera_angle_x"])
    except (KeyError, TypeError, ValueError):
        raise DataError(Path(basedir) / "transforms_test.json", "has no numeric 'camera_angle_x'") from None
    first = Path(basedir) / (metas["train"]["frames"][0]["file_path"] + ".png")
    full_W = iio.improps(first).shape[1] if half_res else W
    focal = .5 * full_W / np.tan(.5 * camera_angle_x)
    if half_res:
        focal = focal / 2.0
    return imgs, poses, spherical_render_poses(), [H, W, focal], i_split
