"""Cameras with lens distortion (OpenCV's models) and their images undistorted to a pinhole camera, in NumPy.

A camera maps the normalised coordinates (x, y) = ((i - cx)/fx, (j - cy)/fy)
of an ideal pinhole image to distorted ones (xd, yd), found in the photo at
pixel (fx xd + cx, fy yd + cy):

* OPENCV (as nerfstudio writes it): r^2 = x^2 + y^2,
  g = 1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8,
  xd = g x + 2 p1 x y + p2 (r^2 + 2 x^2), yd = g y + p1 (r^2 + 2 y^2) + 2 p2 x y;
* OPENCV_FISHEYE: theta = atan(r), theta_d = theta (1 + k1 theta^2 + k2 theta^4
  + k3 theta^6 + k4 theta^8), (xd, yd) = (theta_d / r) (x, y).

Undistorting resamples the photo (bilinear) on the pinhole camera of the
same size and principal point whose focal lengths are s fx, s fy, s the
smallest scale at which every pixel of the pinhole image comes from inside
the photo (no black borders; barrel distortion gives s < 1, a wider view).
`undistorted_files` does this once per capture into `<datadir>/undistorted/`,
reused while the camera is unchanged. No OpenCV or COLMAP needed.
"""
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import imageio.v3 as iio
import numpy as np

from nerf.errors import DataError

CACHE = "undistorted"


@dataclass(frozen=True)
class Camera:
    """One camera: image size (w, h), focal lengths and principal point in
    pixels, its model and distortion coefficients ((name, value), ...) of
    k1, k2, k3, k4, p1, p2."""
    w: int
    h: int
    fx: float
    fy: float
    cx: float
    cy: float
    model: str = "PINHOLE"
    distortion: Tuple[Tuple[str, float], ...] = ()

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsics."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def coefficients(self) -> Dict[str, float]:
        values = dict(self.distortion)
        return {k: float(values.get(k, 0.0)) for k in ("k1", "k2", "k3", "k4", "p1", "p2")}

    @property
    def distorted(self) -> bool:
        return any(v != 0.0 for _, v in self.distortion)


def distort(x: np.ndarray, y: np.ndarray, camera: Camera) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised pinhole coordinates (any shape, float64) to distorted ones (see the module docstring)."""
    c = camera.coefficients
    r2 = x * x + y * y
    if camera.model == "OPENCV_FISHEYE":
        r = np.sqrt(r2)
        theta = np.arctan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (c["k1"] + t2 * (c["k2"] + t2 * (c["k3"] + t2 * c["k4"]))))
        scale = np.where(r > 0, theta_d / np.where(r > 0, r, 1.0), 1.0)
        return x * scale, y * scale
    g = 1 + r2 * (c["k1"] + r2 * (c["k2"] + r2 * (c["k3"] + r2 * c["k4"])))
    xd = g * x + 2 * c["p1"] * x * y + c["p2"] * (r2 + 2 * x * x)
    yd = g * y + c["p1"] * (r2 + 2 * y * y) + 2 * c["p2"] * x * y
    return xd, yd


def source_pixels(camera: Camera, pinhole: Camera) -> Tuple[np.ndarray, np.ndarray]:
    """Where each pixel (i, j) of the `pinhole` image lies in the photo taken by
    `camera`: columns u and rows v, each (h, w) float64."""
    i, j = np.meshgrid(np.arange(pinhole.w, dtype=np.float64), np.arange(pinhole.h, dtype=np.float64))
    xd, yd = distort((i - pinhole.cx) / pinhole.fx, (j - pinhole.cy) / pinhole.fy, camera)
    return camera.fx * xd + camera.cx, camera.fy * yd + camera.cy


def _border(camera: Camera) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates (at scale 1) of the image's border pixels."""
    w, h = camera.w, camera.h
    i = np.concatenate([np.arange(w), np.arange(w), np.zeros(h), np.full(h, w - 1.0)])
    j = np.concatenate([np.zeros(w), np.full(w, h - 1.0), np.arange(h), np.arange(h)])
    return (i - camera.cx) / camera.fx, (j - camera.cy) / camera.fy


def _fits(camera: Camera, scale: float) -> bool:
    """Whether the pinhole camera at focal scale `scale` sees only what the
    photo holds: its border pixels map inside the photo, and the distortion is
    still increasing in radius there (beyond a polynomial's turning point the
    photo's pixels repeat)."""
    x, y = _border(camera)
    x, y = x / scale, y / scale
    xd, yd = distort(x, y, camera)
    xd2, yd2 = distort(1.001 * x, 1.001 * y, camera)
    u, v = camera.fx * xd + camera.cx, camera.fy * yd + camera.cy
    inside = (u >= 0) & (u <= camera.w - 1) & (v >= 0) & (v <= camera.h - 1)
    return bool(inside.all() and (xd2 * xd2 + yd2 * yd2 > xd * xd + yd * yd).all())


def pinhole_for(camera: Camera, where: str = "camera") -> Camera:
    """The undistorted pinhole camera: same size and principal point, focal
    lengths s fx, s fy with s the smallest scale that `_fits` (bisection to
    1e-6; scales above 1 zoom in, below 1 widen the view)."""
    if not 0 <= camera.cx <= camera.w - 1 or not 0 <= camera.cy <= camera.h - 1:
        raise DataError(where, f"{camera.model} camera's principal point ({camera.cx}, {camera.cy}) outside the "
                                      f"{camera.w}x{camera.h} image: cannot undistort")
    hi = 1.0
    while not _fits(camera, hi):
        hi *= 2.0
        if hi > 1e3:
            raise DataError(where, f"{camera.model} distortion {camera.coefficients} leaves no pinhole view inside "
                                          "the image: cannot undistort")
    lo = hi / 2.0
    while lo > 1e-3 and _fits(camera, lo):
        lo /= 2.0
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if _fits(camera, mid) else (mid, hi)
    return Camera(camera.w, camera.h, camera.fx * hi, camera.fy * hi, camera.cx, camera.cy)


def remap(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples (h, w, C) float32 of image (H, W, C) at columns u, rows v (h, w), clamped to the image."""
    H, W = image.shape[:2]
    u, v = np.clip(u, 0, W - 1), np.clip(v, 0, H - 1)
    u0, v0 = np.minimum(np.floor(u).astype(np.int64), W - 2), np.minimum(np.floor(v).astype(np.int64), H - 2)
    a, b = (u - u0)[..., None], (v - v0)[..., None]
    img = image.astype(np.float32)
    top = img[v0, u0] * (1 - a) + img[v0, u0 + 1] * a
    bottom = img[v0 + 1, u0] * (1 - a) + img[v0 + 1, u0 + 1] * a
    return (top * (1 - b) + bottom * b).astype(np.float32)


def undistort_image(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A photo (H, W, C) resampled at its columns u, rows v (h, w) (`source_pixels`),
    in the photo's dtype (integers rounded)."""
    out = remap(image, u, v)
    if np.issubdtype(image.dtype, np.integer):
        return np.clip(np.rint(out), 0, np.iinfo(image.dtype).max).astype(image.dtype)
    return out.astype(image.dtype)


def undistorted_files(capture) -> Tuple[List[Path], Camera]:
    """The capture's images undistorted (`undistort_image`) into
    `<datadir>/undistorted/` as PNGs named `<frame>_<stem>.png`, with
    `camera.json` recording both cameras; a folder made for the same camera
    and files is reused, another one replaced (made in a temporary folder and
    renamed, so an interrupted run leaves none half-written). Returns the
    files, in frame order, and the pinhole camera."""
    camera = capture.camera
    pinhole = pinhole_for(camera, str(capture.path))
    folder = capture.path.parent / CACHE
    names = [f"{k:05d}_{f.stem}.png" for k, f in enumerate(capture.files)]
    record = {"camera": asdict(camera), "pinhole": asdict(pinhole), "sources": [str(f) for f in capture.files]}
    record = json.loads(json.dumps(record))
    record_file = folder / "camera.json"
    if record_file.is_file() and all((folder / n).is_file() for n in names):
        try:
            if json.loads(record_file.read_text()) == record:
                return [folder / n for n in names], pinhole
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if folder.exists() and not record_file.is_file():
        raise DataError(folder, "exists but was not made by this loader (it has no camera.json): move it away, "
                                "it is where the undistorted images go")
    u, v = source_pixels(camera, pinhole)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE}_", dir=folder.parent))
    try:
        for name, source in zip(names, capture.files):
            image = iio.imread(source)
            image = image if image.ndim == 3 else image[..., None]
            out = undistort_image(image, u, v)
            iio.imwrite(tmp / name, out if out.shape[-1] > 1 else out[..., 0])
        (tmp / "camera.json").write_text(json.dumps(record, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [folder / n for n in names], pinhole
