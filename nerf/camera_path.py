"""Camera paths in nerfstudio's `camera_path.json` format, and the camera conventions they meet.

NeRF's poses (and nerfstudio's `camera_to_world`) are OpenGL-style: the camera's
x axis points right, y up, and it looks along -z. viser's browser camera is
OpenCV-style: x right, y down, looking along +z. The two camera-to-world
matrices differ by flipping the camera's y and z axes:

    c2w_opencv = c2w_opengl @ diag(1, -1, -1, 1)    (and back the same way)

A pinhole camera H pixels tall with vertical field of view `fov` has focal
length f = (H / 2) / tan(fov / 2).

The file holds `camera_path`, a list of frames `{"camera_to_world": 16 numbers
(a 4x4 matrix, row-major), "fov": vertical degrees, "aspect": width / height}`,
and `render_height`, `render_width`, `fps`, `seconds`; nerfstudio's other keys
(keyframes, smoothness, ...) are kept for it and ignored here.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from nerf import outputs
from nerf.errors import DataError

FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def opengl_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world (..., 3 or 4, 4) OpenGL-style (looking along -z, y up) to
    OpenCV-style (looking along +z, y down): the camera's y and z axes negated.
    The map is its own inverse, so it also converts back."""
    c2w = np.asarray(c2w, dtype=np.float64)
    return c2w @ FLIP_YZ


opencv_to_opengl = opengl_to_opencv


def focal_from_fov(fov_degrees: float, height: float) -> float:
    """f = (H / 2) / tan(fov / 2), fov the vertical field of view in degrees."""
    return 0.5 * height / math.tan(math.radians(fov_degrees) / 2.0)


def fov_from_focal(focal: float, height: float) -> float:
    """The vertical field of view, in degrees, of a camera H pixels tall: 2 atan(H / (2 f))."""
    return math.degrees(2.0 * math.atan(0.5 * height / focal))


def as_pose(c2w: np.ndarray) -> np.ndarray:
    """A (3 or 4, 4) camera-to-world matrix as a (4, 4) one."""
    pose = np.eye(4)
    pose[:3, :4] = np.asarray(c2w, dtype=np.float64)[:3, :4]
    return pose


@dataclass
class CameraPath:
    """poses (P, 4, 4) OpenGL-style camera-to-world, fovs (P,) vertical degrees,
    the output size H x W, and the video's frames per second."""
    poses: np.ndarray
    fovs: np.ndarray
    H: int
    W: int
    fps: float

    def intrinsics(self, k: int) -> np.ndarray:
        """K (3, 3) of frame k: focal from its fov, principal point at the image centre."""
        f = focal_from_fov(float(self.fovs[k]), self.H)
        return np.array([[f, 0.0, 0.5 * self.W], [0.0, f, 0.5 * self.H], [0.0, 0.0, 1.0]])

    def constant_fov_stretches(self) -> List[Tuple[int, int]]:
        """[(k0, k1), ...]: frames k0 .. k1 - 1 share one field of view."""
        starts = [0] + [k for k in range(1, len(self.fovs)) if self.fovs[k] != self.fovs[k - 1]]
        return list(zip(starts, starts[1:] + [len(self.fovs)]))


def _number(value, where: str, what: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise DataError(where, f"{what} must be a number above {low:g}, not {value!r}")
    return float(value)


def load_camera_path(path) -> CameraPath:
    """Reads and checks a camera_path.json (nerfstudio's format, perspective cameras)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "camera path file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not a readable JSON camera path ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, "a camera path is a JSON object with a 'camera_path' list")
    for key in ("camera_path", "render_height", "render_width", "fps"):
        if key not in data:
            raise DataError(path, f"has no '{key}'")
    if data.get("camera_type", "perspective") != "perspective":
        raise DataError(path, f"camera_type '{data['camera_type']}' is not supported (only 'perspective')")
    frames = data["camera_path"]
    if not isinstance(frames, list) or not frames:
        raise DataError(path, "'camera_path' must be a non-empty list of frames")
    H, W = (data[k] for k in ("render_height", "render_width"))
    for key, value in (("render_height", H), ("render_width", W)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(path, f"'{key}' must be a positive whole number, not {value!r}")
    fps = _number(data["fps"], path, "'fps'")
    poses, fovs = [], []
    for k, frame in enumerate(frames):
        where = f"{path}: camera_path[{k}]"
        if not isinstance(frame, dict) or "camera_to_world" not in frame or "fov" not in frame:
            raise DataError(where, "each frame needs 'camera_to_world' and 'fov'")
        matrix = frame["camera_to_world"]
        if not isinstance(matrix, list) or len(matrix) != 16 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in matrix):
            raise DataError(where, "'camera_to_world' must be 16 numbers (a 4x4 matrix, row by row)")
        pose = np.array(matrix, dtype=np.float64).reshape(4, 4)
        if not np.all(np.isfinite(pose)) or not np.allclose(pose[3], [0, 0, 0, 1], atol=1e-6):
            raise DataError(where, "'camera_to_world' must be finite with last row 0 0 0 1")
        poses.append(pose)
        fovs.append(_number(frame["fov"], where, "'fov'"))
        if fovs[-1] >= 180:
            raise DataError(where, f"'fov' must be below 180 degrees, not {fovs[-1]:g}")
    return CameraPath(np.stack(poses), np.array(fovs), H, W, fps)


def interpolate_poses(keyframes: Sequence[np.ndarray], n_frames: int) -> np.ndarray:
    """n_frames camera-to-world (n, 4, 4) evenly along keyframes (K, 4, 4): the
    position linearly, the rotation by slerp between consecutive keyframes."""
    keys = np.stack([as_pose(k) for k in keyframes])
    if len(keys) == 1 or n_frames == 1:
        return np.repeat(keys[:1], n_frames, 0)
    out = []
    for s in np.linspace(0.0, len(keys) - 1, n_frames):
        k = min(int(s), len(keys) - 2)
        t = s - k
        pose = np.eye(4)
        pose[:3, :3] = _slerp(keys[k, :3, :3], keys[k + 1, :3, :3], t)
        pose[:3, 3] = (1 - t) * keys[k, :3, 3] + t * keys[k + 1, :3, 3]
        out.append(pose)
    return np.stack(out)


def _slerp(R0: np.ndarray, R1: np.ndarray, t: float) -> np.ndarray:
    """R0 (R0^T R1)^t: the rotation t of the way along the shorter arc from R0 (3, 3)
    to R1 (3, 3), through the unit quaternion of the relative rotation."""
    w, v = rotation_quaternion(R0.T @ R1)
    sin_half = np.linalg.norm(v)
    if sin_half < 1e-12:
        return R0.copy()
    axis = v / sin_half
    angle = 2.0 * math.atan2(sin_half, w)   # in [0, pi]: w >= 0 is the shorter arc
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = t * angle
    return R0 @ (np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross)


def rotation_quaternion(R: np.ndarray) -> Tuple[float, np.ndarray]:
    """The unit quaternion (w, (x, y, z)) of a rotation matrix R (3, 3), w >= 0.
    Each component's square is read off the diagonal, and the largest one is taken
    from it (well conditioned, half turns included), the others from the
    off-diagonal sums and differences, which carry their signs."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    squares = [1 + tr, 1 + 2 * R[0, 0] - tr, 1 + 2 * R[1, 1] - tr, 1 + 2 * R[2, 2] - tr]   # 4 w^2, 4 x^2, ...
    big = int(np.argmax(squares))
    root = math.sqrt(max(squares[big], 0.0))   # 2 |q_big|
    sums = {(0, 1): R[2, 1] - R[1, 2], (0, 2): R[0, 2] - R[2, 0], (0, 3): R[1, 0] - R[0, 1],
            (1, 2): R[0, 1] + R[1, 0], (1, 3): R[0, 2] + R[2, 0], (2, 3): R[1, 2] + R[2, 1]}   # 4 q_i q_j
    q = np.array([root / 2 if i == big else sums[min(i, big), max(i, big)] / (2 * root) for i in range(4)])
    q /= np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return float(q[0]), q[1:]


def camera_path_json(poses: np.ndarray, fovs: Sequence[float], H: int, W: int, fps: float,
                     keyframes: List[dict] = ()) -> dict:
    """The camera_path.json content for OpenGL-style poses (P, 3 or 4, 4) with vertical fovs (P,) in degrees."""
    frames = [{"camera_to_world": as_pose(pose).reshape(-1).tolist(), "fov": float(fov), "aspect": W / H}
              for pose, fov in zip(poses, fovs)]
    return {"camera_type": "perspective", "render_height": int(H), "render_width": int(W), "fps": float(fps),
            "seconds": len(frames) / float(fps), "camera_path": frames, "keyframes": list(keyframes)}


def save_camera_path(path, content: dict) -> None:
    """Writes camera_path.json content whole or not at all."""
    outputs.write_text(path, json.dumps(content, indent=2) + "\n")


def check_flag(args) -> None:
    """--camera_path: only with --render_only, and a readable, well-formed file."""
    if getattr(args, "camera_path", None) is None:
        return
    if not args.render_only:
        raise DataError("--camera_path", "renders a camera path with --render_only; add --render_only")
    load_camera_path(args.camera_path)


def check_ndc_camera(path: CameraPath, scene, ndc: bool, where) -> None:
    """Forward-facing scenes are rendered in the training camera's NDC space, which
    render() derives from the rendering camera's W / f and H / f: a path for such a
    scene must keep the training camera's field of view and aspect."""
    if not ndc:
        return
    for k in range(len(path.poses)):
        f = focal_from_fov(float(path.fovs[k]), path.H)
        if not (math.isclose(path.W / f, scene.W / scene.focal, rel_tol=1e-3)
                and math.isclose(path.H / f, scene.H / scene.focal, rel_tol=1e-3)):
            raise DataError(where, f"camera_path[{k}]: a forward-facing (NDC) scene renders with the training "
                                   f"camera's field of view {fov_from_focal(scene.focal, scene.H):.4g} degrees and "
                                   f"aspect {scene.W / scene.H:.4g}, not {path.fovs[k]:.4g} and {path.W / path.H:.4g}")
