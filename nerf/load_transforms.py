"""The `transforms.json` of capture tools (nerfstudio, instant-ngp): `--dataset_type nerfstudio`.

One file `<datadir>/transforms.json` describes every frame:

* the camera, top level or per frame (a frame's keys override the top
  level's): `fl_x`, `fl_y`, `cx`, `cy`, `w`, `h` in pixels, or
  `camera_angle_x` (and `camera_angle_y`) in radians instead of the focal
  lengths; `camera_model` (`PINHOLE`, `OPENCV`, `OPENCV_FISHEYE`; without
  one, instant-ngp's `"is_fisheye": true` is `OPENCV_FISHEYE`, distortion
  `OPENCV`) with `k1`, `k2`, `k3`, `k4`, `p1`, `p2`; other lens terms (`k5`,
  `k6`, `s1`..`s4`, `ftheta_*`) are refused. Missing `fl_y` is `fl_x`,
  missing `w`, `h` the first image's size;
* pixel coordinates: `cx`, `cy` given are the tools' (COLMAP, nerfstudio,
  instant-ngp: pixel i's centre at i + 0.5), so the rays go through pixel
  centres (get_rays' K has cx - 0.5, cy - 0.5; a missing one of the two is
  the image centre w/2 or h/2 on that axis); without both, the principal
  point is the image centre in the original NeRF's convention (K's
  cx = w/2, cy = h/2, as the Blender loader);
* `frames`: `file_path` (relative to datadir; without an extension `.png`
  is tried, as instant-ngp does for Blender scenes) and `transform_matrix`,
  the 4x4 camera-to-world matrix in the OpenGL / NeRF convention (x right,
  y up, looking along -z), as `load_blender` reads;
* optional `train_filenames`, `val_filenames`, `test_filenames` (file paths
  as in the frames); without them every `llffhold`-th frame is held out for
  validation and test, as LLFF scenes are;
* optional `near`, `far` (this project's addition; imgs2poses.py writes
  them); else, with nerfstudio's `ply_file_path` (the capture's sparse
  points), the depths of the points each camera sees (`point_bounds`); else
  from the cameras alone (`camera_bounds`). Positions are then moved so that
  the scene's centre is at the origin (unless the file gives bounds and the
  scene is around its origin already) and scaled with the bounds so that
  far = 6 (`normalised`).

Pixel (i, j)'s ray looks along ((i - K[0, 2])/fx, -(j - K[1, 2])/fy, -1) in
camera axes, as the original's get_rays. `--factor N` reads `images_N/` beside the images' folder when it
exists, else area-averages the images by N; the intrinsics are divided by N.
Distorted images are undistorted once (`nerf.undistort`) and training sees
the undistorted pinhole camera. All frames must share one camera: the ray
code takes one K.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import imageio.v3 as iio
import numpy as np
from PIL import Image

from nerf.errors import DataError
from nerf.sparse_points import point_bounds, read_ply_points
from nerf.undistort import Camera, undistorted_files
from load_blender import area_resize

TRANSFORMS = "transforms.json"
CAMERA_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y", "camera_model",
               "is_fisheye", "k1", "k2", "k3", "k4", "p1", "p2")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
# Lens terms of nerfstudio's FISHEYE624 and OpenCV's rational / thin-prism models, and instant-ngp's f-theta
# lens: refused when non-zero (f-theta: when present), as nothing here undistorts them.
UNSUPPORTED_LENS_KEYS = ("k5", "k6", "s1", "s2", "s3", "s4")
FTHETA_KEYS = ("ftheta_p0", "ftheta_p1", "ftheta_p2", "ftheta_p3", "ftheta_p4")
TOOLS_PIXEL_CENTRE = 0.5     # COLMAP, nerfstudio and instant-ngp: pixel i's centre at i + 0.5
CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "OPENCV_FISHEYE")
SPLIT_KEYS = {"train": "train_filenames", "val": "val_filenames", "test": "test_filenames"}


@dataclass
class Capture:
    """A parsed transforms.json: its path, the frames' image files and
    camera-to-world matrices (N, 4, 4) float32, the shared camera, the index
    arrays of the named splits (None when the file names none), bounds
    (None when the file has none) and the sparse points (P, 3) float64 of its
    `ply_file_path` (None when it names none). Poses are float64, as written:
    a capture far from its origin keeps its digits until `normalised`."""
    path: Path
    files: List[Path]
    poses: np.ndarray
    camera: Camera
    splits: Optional[Dict[str, np.ndarray]]
    near: Optional[float]
    far: Optional[float]
    points: Optional[np.ndarray] = None


def _number(meta: dict, key: str, where: str, path: Path) -> Optional[float]:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(path, f"{where}'{key}' is {value!r}, expected a finite number")
    return float(value)


def _image_file(datadir: Path, file_path: str) -> Path:
    """The frame's image: file_path relative to datadir, `.png` added when it has no extension and the
    bare name does not exist."""
    path = datadir / file_path
    if not path.suffix and not path.exists() and path.with_name(path.name + ".png").exists():
        return path.with_name(path.name + ".png")
    return path


def header_size(path: Path) -> Tuple[int, int]:
    """An image's (width, height) from its header (no pixel decoded)."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as exc:
        raise DataError(path, f"unreadable image ({exc.__class__.__name__})") from None


def _camera(meta: dict, frame: dict, where: str, path: Path, size: Optional[Tuple[int, int]]) -> Camera:
    """The camera of one frame: its keys over the file's top-level keys. `size`
    (w, h) of the first image stands in for missing `w`, `h`."""
    merged = {k: frame.get(k, meta.get(k)) for k in CAMERA_KEYS + UNSUPPORTED_LENS_KEYS}
    for key in UNSUPPORTED_LENS_KEYS:
        if _number(merged, key, where, path):
            raise DataError(path, f"{where}lens term '{key}' = {merged[key]} cannot be undistorted here (k1..k4, "
                                  "p1, p2 only); undistort the images to a pinhole or OPENCV camera first")
    ftheta = [k for k in FTHETA_KEYS if k in frame or k in meta]
    if ftheta:
        raise DataError(path, f"{where}f-theta lens ('{ftheta[0]}') cannot be undistorted here; undistort the "
                              "images to a pinhole or OPENCV camera first")
    fisheye = merged["is_fisheye"]
    if fisheye is not None and not isinstance(fisheye, bool):
        raise DataError(path, f"{where}'is_fisheye' is {fisheye!r}, expected true or false")
    values = {k: _number(merged, k, where, path) for k in CAMERA_KEYS if k not in ("camera_model", "is_fisheye")}
    w = values["w"] if values["w"] is not None else (size[0] if size else None)
    h = values["h"] if values["h"] is not None else (size[1] if size else None)
    if w is None or h is None:
        raise DataError(path, f"{where}has no 'w' and 'h' and its image cannot be read for them")
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise DataError(path, f"{where}image size {w} x {h} is not two positive whole numbers")
    fx, fy = values["fl_x"], values["fl_y"]
    for key, side, focal in (("camera_angle_x", w, fx), ("camera_angle_y", h, fy)):
        angle = values[key]
        if focal is None and angle is not None:
            if not 0 < angle < math.pi:
                raise DataError(path, f"{where}'{key}' is {angle}, expected radians in (0, pi)")
            focal = 0.5 * side / math.tan(0.5 * angle)
            fx, fy = (focal, fy) if key == "camera_angle_x" else (fx, focal)
    fx = fx if fx is not None else fy
    fy = fy if fy is not None else fx
    if fx is None:
        raise DataError(path, f"{where}has no focal length ('fl_x' or 'camera_angle_x')")
    if fx <= 0 or fy <= 0:
        raise DataError(path, f"{where}focal length {fx} x {fy} is not positive")
    model = merged["camera_model"]
    distortion = tuple((k, values[k] or 0.0) for k in DISTORTION_KEYS)
    if fisheye and model not in (None, "OPENCV_FISHEYE"):
        raise DataError(path, f"{where}'is_fisheye' is true but camera_model is {model!r}; give one of them")
    if model is None:
        model = "OPENCV_FISHEYE" if fisheye else "OPENCV" if any(v for _, v in distortion) else "PINHOLE"
    if model not in CAMERA_MODELS:
        raise DataError(path, f"{where}camera_model {model!r} cannot be undistorted here "
                              f"(one of {', '.join(CAMERA_MODELS)}); undistort the images to a pinhole camera first")
    if model in ("PINHOLE", "SIMPLE_PINHOLE") and any(v for _, v in distortion):
        raise DataError(path, f"{where}camera_model {model} with distortion coefficients; use OPENCV")
    if model == "OPENCV_FISHEYE" and any(v for k, v in distortion if k in ("p1", "p2")):
        raise DataError(path, f"{where}OPENCV_FISHEYE has no tangential terms p1, p2")
    cx = values["cx"] if values["cx"] is not None else w / 2.0
    cy = values["cy"] if values["cy"] is not None else h / 2.0
    centre = TOOLS_PIXEL_CENTRE if values["cx"] is not None or values["cy"] is not None else 0.0
    return Camera(int(w), int(h), fx, fy, cx, cy, model, distortion, centre)


def read_capture(datadir) -> Capture:
    """Parses and checks `<datadir>/transforms.json` without decoding an image
    (headers only). Every problem is one DataError naming the file and frame."""
    datadir = Path(datadir)
    path = datadir / TRANSFORMS
    if not path.is_file():
        raise DataError(path, "missing (--dataset_type nerfstudio reads a transforms.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise DataError(path, "has no 'frames' list, or it is empty")
    files, poses, camera, size = [], [], None, None
    for k, frame in enumerate(meta["frames"]):
        where = f"frame {k}: "
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise DataError(path, f"{where}has no 'file_path' string")
        if "transform_matrix" not in frame:
            raise DataError(path, f"{where}({frame['file_path']}) has no 'transform_matrix'")
        try:
            matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            matrix = np.zeros(0)
        if matrix.shape not in ((4, 4), (3, 4)):
            raise DataError(path, f"{where}({frame['file_path']}) 'transform_matrix' is not 4x4 numbers")
        if not np.isfinite(matrix).all():
            raise DataError(path, f"{where}({frame['file_path']}) 'transform_matrix' holds NaN or inf")
        image = _image_file(datadir, frame["file_path"])
        if not image.is_file():
            raise DataError(image, f"missing (frame {k} of {path})")
        actual = header_size(image)
        size = size or actual
        if actual != size:
            raise DataError(image, f"is {actual[0]}x{actual[1]}, frame 0's image is {size[0]}x{size[1]}")
        this = _camera(meta, frame, where, path, size)
        if (this.w, this.h) != actual:
            raise DataError(image, f"is {actual[0]}x{actual[1]} but {path} says w x h = {this.w}x{this.h}")
        if camera is not None and this != camera:
            raise DataError(path, f"{where}camera differs from frame 0's ({this} vs {camera}); all frames must "
                                  "share one camera (undistort and resize them to one first)")
        camera = this
        files.append(image)
        poses.append(np.concatenate([matrix[:3], [[0.0, 0.0, 0.0, 1.0]]], 0))
    near, far = _number(meta, "near", "", path), _number(meta, "far", "", path)
    if (near is None) != (far is None) or (near is not None and not 0 <= near < far):
        raise DataError(path, f"'near' {near} and 'far' {far}: give both, 0 <= near < far")
    points = None
    if meta.get("ply_file_path") is not None:
        if not isinstance(meta["ply_file_path"], str):
            raise DataError(path, f"'ply_file_path' is {meta['ply_file_path']!r}, expected a file path")
        points = read_ply_points(datadir / meta["ply_file_path"])
    return Capture(path, files, np.stack(poses), camera, _splits(meta, path, datadir, files), near, far, points)


def _splits(meta: dict, path: Path, datadir: Path, files: List[Path]) -> Optional[Dict[str, np.ndarray]]:
    """Index arrays of train_filenames / val_filenames / test_filenames (None if absent)."""
    if not any(key in meta for key in SPLIT_KEYS.values()):
        return None
    index = {f.resolve(): k for k, f in enumerate(files)}
    splits = {}
    for split, key in SPLIT_KEYS.items():
        names = meta.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(path, f"'{key}' is not a list of file paths")
        picked = []
        for name in names:
            image = _image_file(datadir, name).resolve()
            if image not in index:
                raise DataError(path, f"'{key}' names {name}, which no frame has")
            picked.append(index[image])
        splits[split] = np.array(picked, dtype=np.int64)
    if not len(splits["train"]):
        raise DataError(path, "'train_filenames' is empty")
    for split in ("val", "test"):
        if not len(splits[split]):
            splits[split] = splits["test" if split == "val" else "val"]
    if not len(splits["test"]):
        raise DataError(path, "names no val or test frames ('val_filenames', 'test_filenames')")
    return splits


def held_out_split(n: int, llffhold: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i_train, i_val, i_test) as LLFF's: every llffhold-th frame held out for both val and test."""
    if llffhold <= 0:
        raise DataError("--llffhold", f"{llffhold}: a transforms.json without test_filenames needs llffhold > 0 "
                                      "to hold out test frames")
    i_test = np.arange(n)[::llffhold]
    i_train = np.array([i for i in range(n) if i not in set(i_test)], dtype=np.int64)
    if not len(i_train):
        raise DataError("--llffhold", f"{llffhold} holds out all {n} frames; none is left to train on")
    return i_train, i_test, i_test


FORWARD_FACING_DEGREES = 45.0   # every viewing axis within this of their mean direction: a forward-facing capture
FORWARD_FAR = 6.0               # its far bound, in distances from the cameras to the scene centre (see camera_bounds)


def camera_bounds(poses: np.ndarray) -> Tuple[float, float, np.ndarray]:
    """(near, far, centre) from the cameras alone (poses (N, 3 or 4, 4) c2w).

    The scene centre is the point nearest all viewing axes (o_k + t (-z_k)) in
    least squares, sum_k (I - a_k a_k^T)(c - o_k) = 0, pulled towards the mean
    camera position where the axes are near parallel (a forward-facing
    capture: ridge weight 1e-2 N). With the cameras at distances d_k from it,
    near = min d / 2. Cameras around the scene, looking in at it, see what
    lies around the centre: far = 3 max d / 2 (lego's cameras, at 4.03, give
    2.02 and 6.05; its loader's bounds are 2 and 6). A forward-facing capture
    (every axis within FORWARD_FACING_DEGREES of their mean) also sees the
    background behind its subject, at depths the cameras alone do not tell:
    far = FORWARD_FAR max d keeps it (fern's cameras meet 17-18 units away,
    COLMAP sees its background at 65-80: far 108)."""
    origins = poses[:, :3, 3].astype(np.float64)
    axes = -poses[:, :3, 2].astype(np.float64)
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    projector = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    ridge = 1e-2 * len(poses)
    A = projector.sum(0) + ridge * np.eye(3)
    b = np.einsum("kij,kj->i", projector, origins) + ridge * origins.mean(0)
    centre = np.linalg.solve(A, b)
    dist = np.linalg.norm(origins - centre, axis=-1)
    return 0.5 * float(dist.min()), (FORWARD_FAR if forward_facing(poses) else 1.5) * float(dist.max()), centre


def forward_facing(poses: np.ndarray) -> bool:
    """Whether every viewing axis (-z of poses (N, 3 or 4, 4)) is within FORWARD_FACING_DEGREES of their mean."""
    axes = -poses[:, :3, 2].astype(np.float64)
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    mean = axes.sum(0) / max(float(np.linalg.norm(axes.sum(0))), 1e-12)
    return bool((axes @ mean).min() > math.cos(math.radians(FORWARD_FACING_DEGREES)))


@dataclass
class Bounds:
    """A capture's near and far bounds, its scene centre (3,), where the bounds came from (for the log) and
    whether the file gave them."""
    near: float
    far: float
    centre: np.ndarray
    source: str
    given: bool = False


def capture_bounds(capture: Capture, poses: np.ndarray, K: np.ndarray, H: int, W: int) -> Bounds:
    """The bounds of the frames `poses` (N, 4, 4) seen through K (3, 3) at H x W: the file's near and far,
    else those of its sparse points (`point_bounds`), else the cameras' (`camera_bounds`, whose centre is
    the scene centre in every case)."""
    near, far, centre = camera_bounds(poses)
    if capture.near is not None:
        return Bounds(capture.near, capture.far, centre, f"'near', 'far' of {capture.path.name}", True)
    if capture.points is not None:
        bounds = point_bounds(capture.points, poses, K, H, W)
        if bounds is not None:
            return Bounds(*bounds, centre, f"the depths of the {len(capture.points)} sparse points the cameras see")
    return Bounds(near, far, centre, "the cameras alone (no near/far or ply_file_path in the file): "
                  + (f"forward-facing, far {FORWARD_FAR:g}x their distance to the scene centre; give near/far "
                     "if the background lies farther" if forward_facing(poses)
                     else "far 1.5x their distance to the scene centre"))


SCENE_FAR = 6.0   # the Blender scenes' far bound: the scale the default positional encoding suits


def normalised(poses: np.ndarray, bounds: Bounds) -> Tuple[np.ndarray, float, float, float, np.ndarray]:
    """Camera positions and bounds with the scene centred and in units where
    far = SCENE_FAR: capture tools write arbitrary units (COLMAP's are often
    tens) and origins (often the first camera, or far away in geographic
    coordinates), while the positional encoding's frequencies (2^0 .. 2^9)
    suit a scene a few units across around the origin. Positions are moved
    by shift = -centre, then scaled by s = SCENE_FAR / far; a file that gives
    its bounds and whose scene lies around its origin (the centre within
    `near` of it, as the Blender scenes) keeps its coordinates (shift = 0).
    Returns
    (poses (N, 4, 4) with translations (t + shift) s, near s, far s, s,
    shift (3,)); s = 1 exactly when far is SCENE_FAR already."""
    centre = np.asarray(bounds.centre, dtype=np.float64)
    keep = bounds.given and np.linalg.norm(centre) <= bounds.near
    shift = np.zeros(3) if keep else -centre
    s = SCENE_FAR / bounds.far
    poses = np.array(poses, dtype=np.float64)
    poses[:, :3, 3] = (poses[:, :3, 3] + shift) * s
    return poses, bounds.near * s, bounds.far * s, s, shift


def read_colours(path: Path) -> np.ndarray:
    """An image's values as read (H, W, C), C = 3 or 4 (grey repeated to RGB)."""
    try:
        img = iio.imread(path)
    except Exception as exc:
        raise DataError(path, f"unreadable image ({exc.__class__.__name__})") from None
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)


def downscaled_file(path: Path, factor: int) -> Optional[Path]:
    """`<folder>_<factor>/<name>` beside the image's folder (nerfstudio's images_N), if it exists."""
    candidate = path.parent.with_name(f"{path.parent.name}_{factor}") / path.name
    return candidate if factor > 1 and candidate.is_file() else None


def load_transforms_data(datadir, factor: int = 1, testskip: int = 1, llffhold: int = 8):
    """Loads `<datadir>/transforms.json`. Returns images (N, H, W, C) (uint8
    values as read where no resizing was needed, else float32 in [0, 1]),
    poses (N, 4, 4), render_poses (N, 4, 4: the loaded frames' cameras in file
    order, a path through the capture as it was taken), K (3, 3) of the images as
    returned, (i_train, i_val, i_test) and the scene's `Bounds` (`capture_bounds`;
    poses and bounds in the file's units, see `normalised`). Named val and test
    splits keep every `testskip`-th frame (as the Blender loader)."""
    capture = read_capture(datadir)
    files, camera = capture.files, capture.camera
    undistorted = camera.distorted
    if undistorted:
        files, camera = undistorted_files(capture)
    if capture.splits is not None:
        skip = {"train": 1, "val": max(testskip, 1), "test": max(testskip, 1)}
        i_split = [capture.splits[s][::skip[s]] for s in ("train", "val", "test")]
    else:
        i_split = list(held_out_split(len(files), llffhold))
    keep = np.unique(np.concatenate(i_split))
    position = {int(i): k for k, i in enumerate(keep)}
    i_split = [np.array([position[int(i)] for i in split], dtype=np.int64) for split in i_split]
    images = []
    for i in keep:
        path = files[i]
        small = None if undistorted else downscaled_file(path, factor)
        img = read_colours(small or path)
        if factor > 1 and small is None:
            scale = 255.0 if img.dtype == np.uint8 else float(np.iinfo(img.dtype).max)
            img = area_resize(img.astype(np.float32) / scale, img.shape[0] // factor, img.shape[1] // factor)
        if images and img.shape != images[0].shape:
            raise DataError(small or path, f"has shape {img.shape}, the first image {images[0].shape}")
        images.append(img)
    K = camera.scaled_K(factor)
    images = np.stack(images, 0)
    if images.dtype not in (np.uint8, np.float32):
        images = images.astype(np.float32) / float(np.iinfo(images.dtype).max)
    poses = capture.poses[keep]
    return images, poses, poses, K, i_split, capture_bounds(capture, poses, K, images.shape[1], images.shape[2])
