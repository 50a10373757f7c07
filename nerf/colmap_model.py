"""Read COLMAP sparse models and convert them to LLFF's ``poses_bounds.npy`` and to a ``transforms.json``.

Pure numpy, no COLMAP installation needed. A COLMAP sparse model is a folder
with ``cameras``, ``images`` and ``points3D`` files, either all ``.bin`` or all
``.txt`` (COLMAP 3.12+ also writes ``rigs`` and ``frames`` files; they are not
needed here and are ignored).

Conventions (see SPEC.md section 5):

* COLMAP stores, per image, the world-to-camera rotation as a unit quaternion
  ``qvec = (w, x, y, z)`` and the translation ``tvec``, so a world point ``X``
  has camera coordinates ``R X + t``; camera axes are x right, y down,
  z forward. The camera-to-world transform is ``[R^T | -R^T t]``.
* An LLFF pose is a 3x5 matrix: columns 0-2 are the camera-to-world rotation
  with axes (down, right, back) = (y, x, -z) of COLMAP's camera, column 3 is
  the camera centre and column 4 is ``[H, W, focal]``. ``poses_bounds.npy``
  holds one row per image: the 3x5 matrix flattened row by row (15 values),
  then the near and far bounds: the 0.1 and 99.9 percentiles of the z-depths
  of the 3D points that the image observes (as LLFF's ``imgs2poses.py``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from nerf.undistort import Camera as UndistortCamera

#: Camera models converted: to poses_bounds.npy with their first focal length
#: (distortion and principal point ignored, as the original LLFF tool does),
#: and to transforms.json with everything (`nerf_camera`).
SUPPORTED_MODELS: tuple[str, ...] = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV",
                                     "OPENCV_FISHEYE", "FULL_OPENCV", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE")

#: COLMAP's parameters of each supported model, by the names transforms.json uses
#: (f is fl_x = fl_y; COLMAP's radial fisheye models are OpenCV's fisheye with k1, k2).
MODEL_PARAMETERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "SIMPLE_PINHOLE": ("PINHOLE", ("f", "cx", "cy")),
    "PINHOLE": ("PINHOLE", ("fx", "fy", "cx", "cy")),
    "SIMPLE_RADIAL": ("OPENCV", ("f", "cx", "cy", "k1")),
    "RADIAL": ("OPENCV", ("f", "cx", "cy", "k1", "k2")),
    "OPENCV": ("OPENCV", ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2")),
    "OPENCV_FISHEYE": ("OPENCV_FISHEYE", ("fx", "fy", "cx", "cy", "k1", "k2", "k3", "k4")),
    "FULL_OPENCV": ("OPENCV", ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")),
    "SIMPLE_RADIAL_FISHEYE": ("OPENCV_FISHEYE", ("f", "cx", "cy", "k1")),
    "RADIAL_FISHEYE": ("OPENCV_FISHEYE", ("f", "cx", "cy", "k1", "k2")),
}

#: COLMAP camera model id -> (name, number of parameters). The binary
#: ``cameras.bin`` stores only the id, so the parameter count is needed to
#: parse it, also for the models that are refused later.
CAMERA_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
    12: ("SIMPLE_DIVISION", 4),
    13: ("DIVISION", 5),
    14: ("SIMPLE_FISHEYE", 3),
    15: ("FISHEYE", 4),
    16: ("EUCM", 6),
    17: ("EQUIRECTANGULAR", 2),
}

#: Percentiles of the observed points' depths used as near and far bounds.
NEAR_PERCENTILE = 0.1
FAR_PERCENTILE = 99.9


class ColmapModelError(ValueError):
    """A model file is missing, malformed or unsupported.

    ``path`` names the offending file or folder, ``message`` says what is wrong;
    ``str(err)`` is ``"<path>: <message>"``.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


@dataclass
class Camera:
    """One COLMAP camera (intrinsics)."""

    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # (P,) float64, meaning depends on ``model``


@dataclass
class Image:
    """One registered COLMAP image (extrinsics and its 2D keypoints)."""

    id: int
    qvec: np.ndarray  # (4,) float64, world-to-camera rotation (w, x, y, z)
    tvec: np.ndarray  # (3,) float64, world-to-camera translation
    camera_id: int
    name: str
    xys: np.ndarray  # (P, 2) float64 keypoint positions in pixels
    point3d_ids: np.ndarray  # (P,) int64, -1 where a keypoint has no 3D point


@dataclass
class Points3D:
    """All 3D points of a model, as arrays, with their tracks flattened.

    Observation ``k`` says that image ``track_image_ids[k]`` sees the point in
    row ``track_rows[k]`` (its keypoint ``track_point2d_idxs[k]``).
    """

    ids: np.ndarray  # (M,) int64
    xyz: np.ndarray  # (M, 3) float64
    rgb: np.ndarray  # (M, 3) uint8
    errors: np.ndarray  # (M,) float64 mean reprojection error
    track_rows: np.ndarray  # (K,) int64 row into ids/xyz
    track_image_ids: np.ndarray  # (K,) int64
    track_point2d_idxs: np.ndarray  # (K,) int64

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Model:
    """A COLMAP sparse model as read from ``path`` (``fmt`` is "bin" or "txt")."""

    cameras: dict[int, Camera]
    images: dict[int, Image]
    points3d: Points3D
    path: Path
    fmt: str

    def file(self, stem: str) -> Path:
        """The file this model was read from for ``stem`` ("cameras", ...)."""
        return self.path / f"{stem}.{self.fmt}"


# --------------------------------------------------------------------------
# Text format


def _data_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, stripped line) for each non-empty, non-comment line."""
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield lineno, line


def read_cameras_text(path: str | Path) -> dict[int, Camera]:
    """Parse ``cameras.txt``: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS...`` per line."""
    path = Path(path)
    cameras: dict[int, Camera] = {}
    for lineno, line in _data_lines(path):
        fields = line.split()
        try:
            cam_id, model = int(fields[0]), fields[1]
            width, height = int(fields[2]), int(fields[3])
            params = np.array([float(v) for v in fields[4:]], dtype=np.float64)
        except (IndexError, ValueError):
            raise ColmapModelError(path, f"line {lineno}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...'") from None
        cameras[cam_id] = Camera(cam_id, model, width, height, params)
    return cameras


def read_images_text(path: str | Path) -> dict[int, Image]:
    """Parse ``images.txt``: two lines per image.

    First ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME``, then the keypoints
    as ``X Y POINT3D_ID`` triplets (that second line may be empty).
    """
    path = Path(path)
    images: dict[int, Image] = {}
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        lineno = i
        fields = line.split(maxsplit=9)
        try:
            if len(fields) != 10:
                raise ValueError
            image_id = int(fields[0])
            qvec = np.array([float(v) for v in fields[1:5]])
            tvec = np.array([float(v) for v in fields[5:8]])
            cam_id = int(fields[8])
            name = fields[9]
        except ValueError:
            raise ColmapModelError(
                path, f"line {lineno}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME'") from None
        # The keypoint line always follows, even when it is empty.
        pts_line = lines[i].strip() if i < len(lines) else ""
        i += 1
        try:
            values = pts_line.split()
            if len(values) % 3:
                raise ValueError
            arr = np.array(values, dtype=np.float64).reshape(-1, 3)
        except ValueError:
            raise ColmapModelError(path, f"line {lineno + 1}: expected 'X Y POINT3D_ID' triplets") from None
        images[image_id] = Image(image_id, qvec, tvec, cam_id, name,
                                 arr[:, :2].copy(), arr[:, 2].astype(np.int64))
    return images


def read_points3d_text(path: str | Path) -> Points3D:
    """Parse ``points3D.txt``: ``POINT3D_ID X Y Z R G B ERROR (IMAGE_ID POINT2D_IDX)...``."""
    path = Path(path)
    ids: list[int] = []
    xyz: list[list[float]] = []
    rgb: list[list[int]] = []
    errors: list[float] = []
    rows: list[np.ndarray] = []
    track: list[np.ndarray] = []
    for lineno, line in _data_lines(path):
        fields = line.split()
        try:
            if len(fields) < 8 or (len(fields) - 8) % 2:
                raise ValueError
            ids.append(int(fields[0]))
            xyz.append([float(v) for v in fields[1:4]])
            rgb.append([int(v) for v in fields[4:7]])
            errors.append(float(fields[7]))
            t = np.array(fields[8:], dtype=np.int64).reshape(-1, 2)
        except ValueError:
            raise ColmapModelError(
                path, f"line {lineno}: expected 'POINT3D_ID X Y Z R G B ERROR (IMAGE_ID POINT2D_IDX)...'") from None
        track.append(t)
        rows.append(np.full(len(t), len(ids) - 1, dtype=np.int64))
    track_arr = np.concatenate(track) if track else np.zeros((0, 2), np.int64)
    return Points3D(
        ids=np.array(ids, dtype=np.int64),
        xyz=np.array(xyz, dtype=np.float64).reshape(-1, 3),
        rgb=np.array(rgb, dtype=np.uint8).reshape(-1, 3),
        errors=np.array(errors, dtype=np.float64),
        track_rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
        track_image_ids=track_arr[:, 0].copy(),
        track_point2d_idxs=track_arr[:, 1].copy(),
    )


# --------------------------------------------------------------------------
# Binary format (little endian, as COLMAP writes it)


class _Reader:
    """Sequential little-endian reader over a whole file's bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buf = path.read_bytes()
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct("<" + fmt)
        if self.pos + s.size > len(self.buf):
            raise ColmapModelError(self.path, "file ends early (truncated, or not a COLMAP binary model)")
        out = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return out

    def array(self, dtype: np.dtype | str, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        if count < 0 or self.pos + dtype.itemsize * count > len(self.buf):
            raise ColmapModelError(self.path, "file ends early (truncated, or not a COLMAP binary model)")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += dtype.itemsize * count
        return out

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ColmapModelError(self.path, "file ends early (truncated, or not a COLMAP binary model)")
        s = self.buf[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return s

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise ColmapModelError(self.path, f"{len(self.buf) - self.pos} unexpected bytes at the end")


def read_cameras_binary(path: str | Path) -> dict[int, Camera]:
    """Parse ``cameras.bin``: count, then per camera id (u32), model id (i32),
    width and height (u64), and the model's parameters (f64 each)."""
    r = _Reader(Path(path))
    (num,) = r.unpack("Q")
    cameras: dict[int, Camera] = {}
    for _ in range(num):
        cam_id, model_id, width, height = r.unpack("IiQQ")
        if model_id not in CAMERA_MODELS:
            raise ColmapModelError(path, f"camera {cam_id} has unknown camera model id {model_id}")
        model, n_params = CAMERA_MODELS[model_id]
        params = r.array("<f8", n_params).astype(np.float64)
        cameras[cam_id] = Camera(cam_id, model, width, height, params)
    r.done()
    return cameras


_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])


def read_images_binary(path: str | Path) -> dict[int, Image]:
    """Parse ``images.bin``: count, then per image id (u32), qvec (4 f64), tvec
    (3 f64), camera id (u32), NUL-terminated name, keypoint count (u64) and
    keypoints (x, y f64; 3D point id u64 with 2^64-1 for none)."""
    r = _Reader(Path(path))
    (num,) = r.unpack("Q")
    images: dict[int, Image] = {}
    for _ in range(num):
        image_id, qw, qx, qy, qz, tx, ty, tz, cam_id = r.unpack("I7dI")
        name = r.cstring()
        (n_pts,) = r.unpack("Q")
        pts = r.array(_POINT2D, n_pts)
        images[image_id] = Image(
            image_id, np.array([qw, qx, qy, qz]), np.array([tx, ty, tz]), cam_id, name,
            np.stack([pts["x"], pts["y"]], axis=1), pts["id"].astype(np.int64))
    r.done()
    return images


def read_points3d_binary(path: str | Path) -> Points3D:
    """Parse ``points3D.bin``: count, then per point id (u64), xyz (3 f64), rgb
    (3 u8), error (f64), track length (u64) and track (image id, keypoint
    index: u32 each)."""
    r = _Reader(Path(path))
    (num,) = r.unpack("Q")
    ids = np.empty(num, np.int64)
    xyz = np.empty((num, 3), np.float64)
    rgb = np.empty((num, 3), np.uint8)
    errors = np.empty(num, np.float64)
    lengths = np.empty(num, np.int64)
    tracks: list[np.ndarray] = []
    for k in range(num):
        pid, x, y, z, cr, cg, cb, err, n_track = r.unpack("Q3d3BdQ")
        ids[k] = pid
        xyz[k] = (x, y, z)
        rgb[k] = (cr, cg, cb)
        errors[k] = err
        lengths[k] = n_track
        tracks.append(r.array("<u4", 2 * n_track))
    r.done()
    track = (np.concatenate(tracks) if tracks else np.zeros(0, np.uint32)).astype(np.int64).reshape(-1, 2)
    return Points3D(ids, xyz, rgb, errors, np.repeat(np.arange(num, dtype=np.int64), lengths),
                    track[:, 0].copy(), track[:, 1].copy())


# --------------------------------------------------------------------------
# Whole models


def find_model_format(path: str | Path) -> str | None:
    """"bin" or "txt" if ``path`` holds a complete model in that format (binary
    preferred, as COLMAP does), else None."""
    path = Path(path)
    for fmt in ("bin", "txt"):
        if all((path / f"{stem}.{fmt}").is_file() for stem in ("cameras", "images", "points3D")):
            return fmt
    return None


def read_model(path: str | Path) -> Model:
    """Read the sparse model in folder ``path`` (binary or text, detected).

    Raises ColmapModelError when the folder or one of the three files is
    missing or malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise ColmapModelError(path, "no such folder")
    fmt = find_model_format(path)
    if fmt is None:
        raise ColmapModelError(
            path, "not a COLMAP sparse model: expected cameras, images and points3D files, all .bin or all .txt")
    try:
        if fmt == "bin":
            cameras = read_cameras_binary(path / "cameras.bin")
            images = read_images_binary(path / "images.bin")
            points = read_points3d_binary(path / "points3D.bin")
        else:
            cameras = read_cameras_text(path / "cameras.txt")
            images = read_images_text(path / "images.txt")
            points = read_points3d_text(path / "points3D.txt")
    except UnicodeDecodeError as err:
        raise ColmapModelError(path, f"cannot decode a {fmt} model file: {err}") from None
    return Model(cameras, images, points, path, fmt)


# --------------------------------------------------------------------------
# Conversion to LLFF


def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) of a quaternion (4,) given as (w, x, y, z).

    The quaternion is normalised first (text models round it).
    """
    w, x, y, z = np.asarray(qvec, dtype=np.float64) / np.linalg.norm(qvec)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def camera_focal(camera: Camera) -> float:
    """Focal length in pixels of a supported camera model.

    Every supported model starts with ``f`` or ``fx, fy``; as the LLFF tool,
    we take params[0]. Distortion and the principal point are ignored (the
    transforms.json imgs2poses.py writes beside has them). Raises ColmapModelError (path
    ``cameras``) for other models.
    """
    if camera.model not in SUPPORTED_MODELS:
        raise ColmapModelError(
            "cameras", f"camera {camera.id} uses model {camera.model}, which cannot be converted "
            f"(supported: {', '.join(SUPPORTED_MODELS)}); reconstruct again with one of those camera models")
    return float(camera.params[0])


def nerf_camera(camera: Camera) -> UndistortCamera:
    """The camera as transforms.json and nerf.undistort describe it: fl_x, fl_y,
    cx, cy, w, h and camera_model OPENCV / OPENCV_FISHEYE / PINHOLE with k1..k4,
    p1, p2, with COLMAP's pixel centres (pixel i's centre at i + 0.5).
    FULL_OPENCV's rational terms (k4, k5, k6 in COLMAP's order) must be 0. Raises ColmapModelError (path ``cameras``) for other models."""
    if camera.model not in MODEL_PARAMETERS:
        raise ColmapModelError(
            "cameras", f"camera {camera.id} uses model {camera.model}, which cannot be undistorted here "
            f"(supported: {', '.join(SUPPORTED_MODELS)}); reconstruct again with one of those camera models")
    model, names = MODEL_PARAMETERS[camera.model]
    p = dict(zip(names, (float(v) for v in camera.params)))
    if camera.model == "FULL_OPENCV":
        if any(p.pop(k) for k in ("k4", "k5", "k6")):
            raise ColmapModelError("cameras", f"camera {camera.id}: FULL_OPENCV with rational terms k4..k6 "
                                              "cannot be undistorted here; use OPENCV")
    fx, fy = (p.pop("f"),) * 2 if "f" in p else (p.pop("fx"), p.pop("fy"))
    cx, cy = p.pop("cx"), p.pop("cy")
    distortion = tuple((k, p.get(k, 0.0)) for k in ("k1", "k2", "k3", "k4", "p1", "p2")) if model != "PINHOLE" else ()
    return UndistortCamera(int(camera.width), int(camera.height), fx, fy, cx, cy, model, distortion,
                           pixel_centre=0.5)


def colmap_to_llff_pose(R: np.ndarray, t: np.ndarray, height: float, width: float, focal: float) -> np.ndarray:
    """LLFF 3x5 pose (3, 5) from COLMAP's world-to-camera ``R`` (3, 3) and ``t`` (3,).

    Columns: camera-to-world axes down (COLMAP y), right (x), back (-z); camera
    centre ``-R^T t``; ``[height, width, focal]``.
    """
    R = np.asarray(R, dtype=np.float64)
    c2w_rot = R.T  # columns: camera x, y, z axes in world coordinates
    centre = -R.T @ np.asarray(t, dtype=np.float64)
    return np.column_stack([c2w_rot[:, 1], c2w_rot[:, 0], -c2w_rot[:, 2], centre,
                            [height, width, focal]])


def observed_depths(model: Model) -> dict[int, np.ndarray]:
    """Image id -> (K_i,) z-depths of the distinct 3D points that image observes.

    The z-depth of point X seen from an image with world-to-camera (R, t) is the
    third camera coordinate ``(R X + t)[2]``, i.e. the distance along the
    optical axis (positive in front of the camera).
    """
    pts = model.points3d
    pairs = np.unique(np.stack([pts.track_image_ids, pts.track_rows], axis=1), axis=0) \
        if len(pts.track_rows) else np.zeros((0, 2), np.int64)
    out: dict[int, np.ndarray] = {}
    for image_id in model.images:
        out[image_id] = np.zeros(0)
    order = np.argsort(pairs[:, 0], kind="stable")
    pairs = pairs[order]
    splits = np.flatnonzero(np.diff(pairs[:, 0])) + 1
    for group in np.split(pairs, splits):
        if not len(group):
            continue
        image_id = int(group[0, 0])
        image = model.images.get(image_id)
        if image is None:  # a track names an image the model does not hold
            continue
        R = qvec_to_rotmat(image.qvec)
        out[image_id] = pts.xyz[group[:, 1]] @ R[2] + image.tvec[2]
    return out


def model_to_poses_bounds(model: Model, names: Iterable[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Convert a model to LLFF ``poses_bounds`` rows.

    Uses every image of the model (COLMAP writes only registered images), or,
    when ``names`` is given, only those whose name is in it. Returns the
    (N, 17) float64 array (rows sorted by image name: 15 values of the 3x5
    pose, near, far) and the N names in the same order.

    Raises ColmapModelError for an unsupported camera model or an image that
    observes no 3D point (no bounds can be computed).
    """
    wanted = None if names is None else set(names)
    chosen = sorted((im for im in model.images.values() if wanted is None or im.name in wanted),
                    key=lambda im: im.name)
    depths = observed_depths(model)
    rows = np.zeros((len(chosen), 17), dtype=np.float64)
    for k, image in enumerate(chosen):
        camera = model.cameras.get(image.camera_id)
        if camera is None:
            raise ColmapModelError(model.file("images"),
                                   f"image {image.name} refers to camera {image.camera_id}, "
                                   f"which {model.file('cameras')} does not define")
        try:
            focal = camera_focal(camera)
        except ColmapModelError as err:
            raise ColmapModelError(model.file("cameras"), err.message) from None
        pose = colmap_to_llff_pose(qvec_to_rotmat(image.qvec), image.tvec, camera.height, camera.width, focal)
        z = depths[image.id]
        if len(z) == 0:
            raise ColmapModelError(model.file("points3D"),
                                   f"image {image.name} observes no 3D point, so it has no depth bounds")
        rows[k, :15] = pose.ravel()
        rows[k, 15] = np.percentile(z, NEAR_PERCENTILE)
        rows[k, 16] = np.percentile(z, FAR_PERCENTILE)
    return rows, [im.name for im in chosen]


def camera_keys(camera: UndistortCamera) -> dict:
    """transforms.json's camera keys (nerfstudio's names) of a camera."""
    keys = {"camera_model": camera.model, "fl_x": camera.fx, "fl_y": camera.fy, "cx": camera.cx,
            "cy": camera.cy, "w": camera.w, "h": camera.h}
    return {**keys, **(camera.coefficients if camera.model != "PINHOLE" else {})}


def model_to_transforms(model: Model, rows: np.ndarray, names: list[str], image_folder: str = "images") -> dict:
    """transforms.json's content (nerfstudio / instant-ngp format) for the images
    `names` with their poses_bounds `rows` (from `model_to_poses_bounds`): each
    frame's ``file_path`` (image_folder/name) and OpenGL camera-to-world
    ``transform_matrix`` ([R^T | -R^T t] with the y and z axes negated), the
    camera keys (`camera_keys`; top level when all images share one camera,
    else per frame), and near = 0.9 min(near bounds), far = max(far bounds)
    (as the LLFF loader's --no_ndc bounds), in COLMAP's world units."""
    by_name = {im.name: im for im in model.images.values()}
    frames, cameras = [], []
    for name in names:
        image = by_name[name]
        camera = model.cameras.get(image.camera_id)
        try:
            cameras.append(camera_keys(nerf_camera(camera)))
        except ColmapModelError as err:
            raise ColmapModelError(model.file("cameras"), err.message) from None
        R = qvec_to_rotmat(image.qvec)
        c2w = np.eye(4)
        c2w[:3, :3] = R.T @ np.diag([1.0, -1.0, -1.0])
        c2w[:3, 3] = -R.T @ np.asarray(image.tvec, dtype=np.float64)
        frames.append({"file_path": f"{image_folder}/{name}", "transform_matrix": c2w.tolist()})
    meta: dict = {}
    if all(c == cameras[0] for c in cameras):
        meta.update(cameras[0])
    else:
        for frame, keys in zip(frames, cameras):
            frame.update(keys)
    meta.update(near=0.9 * float(rows[:, 15].min()), far=float(rows[:, 16].max()), frames=frames)
    return meta
