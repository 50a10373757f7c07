"""Cameras with lens distortion (OpenCV's models) and their images undistorted to a pinhole camera, in NumPy.

A camera maps the normalised coordinates (x, y) = ((i + c - cx)/fx, (j + c - cy)/fy)
of pixel (i, j) of an ideal pinhole image to distorted ones (xd, yd), found in
the photo at pixel (fx xd + cx - c, fy yd + cy - c). c is the camera's
`pixel_centre`: 0.5 for cameras from COLMAP, nerfstudio and instant-ngp, whose
pixel (i, j) covers [i, i + 1) x [j, j + 1) with its centre at (i + 0.5, j + 0.5);
0 for the original NeRF's convention, where get_rays casts the ray of pixel i
through i - cx. `Camera.K` is always in get_rays' convention (cx - c, cy - c).

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
    pixels, its model, distortion coefficients ((name, value), ...) of
    k1, k2, k3, k4, p1, p2, and where the principal point's pixel coordinates
    put a pixel's centre (`pixel_centre`, see the module docstring)."""
    w: int
    h: int
    fx: float
    fy: float
    cx: float
    cy: float
    model: str = "PINHOLE"
    distortion: Tuple[Tuple[str, float], ...] = ()
    pixel_centre: float = 0.0

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsics in get_rays' pixel coordinates (pixel i's ray through i - K[0, 2])."""
        return self.scaled_K(1)

    def scaled_K(self, factor: int) -> np.ndarray:
        """K (3, 3) float64 of the images area-averaged by `factor` (pixel i then covers the original's
        [i factor, (i + 1) factor)): the focal lengths and the principal point, measured from the image's
        edge, divided by factor, then in get_rays' pixel coordinates (the original's K / factor when
        pixel_centre is 0)."""
        c = self.pixel_centre
        return np.array([[self.fx / factor, 0.0, self.cx / factor - c], [0.0, self.fy / factor, self.cy / factor - c],
                         [0.0, 0.0, 1.0]])

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
    `camera`: columns u and rows v (pixel indices), each (h, w) float64."""
    i, j = np.meshgrid(np.arange(pinhole.w, dtype=np.float64), np.arange(pinhole.h, dtype=np.float64))
    (_, _, ci), (_, _, cj) = pinhole.K[:2]
    xd, yd = distort((i - ci) / pinhole.fx, (j - cj) / pinhole.fy, camera)
    (_, _, ui), (_, _, vj) = camera.K[:2]
    return camera.fx * xd + ui, camera.fy * yd + vj


def _border(camera: Camera) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates (at scale 1) of the image's border pixels."""
    w, h = camera.w, camera.h
    i = np.concatenate([np.arange(w), np.arange(w), np.zeros(h), np.full(h, w - 1.0)])
    j = np.concatenate([np.zeros(w), np.full(w, h - 1.0), np.arange(h), np.arange(h)])
    (_, _, ci), (_, _, cj) = camera.K[:2]
    return (i - ci) / camera.fx, (j - cj) / camera.fy


def _fits(camera: Camera, scale: float) -> bool:
    """Whether the pinhole camera at focal scale `scale` sees only what the
    photo holds: its border pixels map inside the photo, and the distortion is
    still increasing in radius there (beyond a polynomial's turning point the
    photo's pixels repeat)."""
    x, y = _border(camera)
    x, y = x / scale, y / scale
    xd, yd = distort(x, y, camera)
    xd2, yd2 = distort(1.001 * x, 1.001 * y, camera)
    (_, _, ui), (_, _, vj) = camera.K[:2]
    u, v = camera.fx * xd + ui, camera.fy * yd + vj
    inside = (u >= 0) & (u <= camera.w - 1) & (v >= 0) & (v <= camera.h - 1)
    return bool(inside.all() and (xd2 * xd2 + yd2 * yd2 > xd * xd + yd * yd).all())


def pinhole_for(camera: Camera, where: str = "camera") -> Camera:
    """The undistorted pinhole camera: same size and principal point, focal
    lengths s fx, s fy with s the smallest scale that `_fits` (bisection to
    1e-6; scales above 1 zoom in, below 1 widen the view)."""
    (_, _, ci), (_, _, cj) = camera.K[:2]
    if not 0 <= ci <= camera.w - 1 or not 0 <= cj <= camera.h - 1:
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
    return Camera(camera.w, camera.h, camera.fx * hi, camera.fy * hi, camera.cx, camera.cy,
                  pixel_centre=camera.pixel_centre)


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


def _stamp(path: Path) -> list:
    """[path, size in bytes, modification time in ns] of a source photo: what tells an edited photo apart."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror or exc})") from None
    return [str(path), stat.st_size, stat.st_mtime_ns]


def undistorted_files(capture) -> Tuple[List[Path], Camera]:
    """The capture's images undistorted (`undistort_image`) into
    `<datadir>/undistorted/` as PNGs named `<frame>_<stem>.png`, with
    `camera.json` recording both cameras and each source photo's path, size
    and modification time; a folder made for the same camera and the same
    photos (an edited photo has another size or time) is reused, another one
    replaced (made in a temporary folder and
    renamed, so an interrupted run leaves none half-written). Returns the
    files, in frame order, and the pinhole camera."""
    camera = capture.camera
    pinhole = pinhole_for(camera, str(capture.path))
    folder = capture.path.parent / CACHE
    names = [f"{k:05d}_{f.stem}.png" for k, f in enumerate(capture.files)]
    record = {"camera": asdict(camera), "pinhole": asdict(pinhole), "sources": [_stamp(f) for f in capture.files]}
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
