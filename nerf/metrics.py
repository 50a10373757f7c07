"""Test-set scores computed the way the NeRF paper's authors computed them.

The convention (bmild/nerf issue 66): the rendered test images and the ground
truth (Blender: alpha-matted onto white) are both taken as the saved 8-bit
PNGs divided by 255, then scored with

- PSNR with max value 1 (``tf.image.psnr(..., max_val=1.)``),
- SSIM as ``tf.image.ssim(..., max_val=1.)`` computes it: an 11x11 Gaussian
  window with sigma 1.5, K1 = 0.01, K2 = 0.03, filtered over the 'valid'
  region only (no padding), averaged over pixels, per channel, then over
  channels,
- LPIPS with the VGG network (``lpips`` package, ``net='vgg'``), images fed in
  [-1, 1].

Each view is scored on its own and the means are plain means over views.

PSNR is *not* capped: a render identical to its ground truth (MSE 0) scores
``math.inf`` here, as ``tf.image.psnr`` and ``mse2psnr`` give. Because strict
JSON has no infinity, ``metrics.json`` stores such a value as the string
``"inf"``; :func:`load_metrics` turns it back into ``math.inf``.

LPIPS needs the ``lpips`` package, torchvision, and the ImageNet VGG16 weights
in the torch hub cache. The weights are fetched once into that cache on first
use, as torchvision's model zoo would, saying so in one line, unless
downloads are off (``--no_download``, ``$NERF_NO_DOWNLOAD``). When anything
is missing, the scores say LPIPS is unavailable and why; no value is made up.

Shapes: an image is ``(H, W, C)`` (or ``(H, W)``), floats in [0, 1] or uint8;
a set of views is ``(N, H, W, C)`` or a sequence of images.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMAT = "nerf-pytorch-metrics/1"
CONVENTION = (
    "render and ground truth as 8-bit images / 255 (Blender ground truth "
    "alpha-matted on white when white_bkgd); PSNR max_val 1 (not capped: "
    "identical images give inf); SSIM as tf.image.ssim (Gaussian 11, sigma 1.5, "
    "K1 0.01, K2 0.03, max_val 1, valid region, per channel then averaged); "
    "LPIPS lpips net='vgg' on [-1, 1] inputs; means over views "
    "(bmild/nerf issue 66)"
)
METRICS_FILENAME = "metrics.json"
# Set (to anything but "" or "0") to keep LPIPS from fetching its VGG16 weights.
NO_DOWNLOAD_ENV = "NERF_NO_DOWNLOAD"
_RENDER_NAME = re.compile(r"^\d+\.png$")
log = logging.getLogger("nerf")


# --------------------------------------------------------------------------
# 8-bit convention


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``to8b``: ``(255 * clip(x, 0, 1)).astype(uint8)``, same shape.

    Truncates, as the original's ``to8b`` does, so that scoring an in-memory
    render gives exactly what scoring its saved PNG gives. uint8 input is
    returned unchanged.
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    return (255 * np.clip(arr, 0, 1)).astype(np.uint8)


def quantize_8bit(img: np.ndarray) -> np.ndarray:
    """An image as its 8-bit PNG would hold it, divided by 255.

    ``(H, W, C)`` (any shape) in, float64 of the same shape out, every value
    a multiple of 1/255. Images that came from 8-bit files (``imread / 255``)
    come back unchanged.
    """
    return to_uint8(img).astype(np.float64) / 255.0


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``(..., 4)`` RGBA in [0, 1] to ``(..., 3)`` RGB: ``rgb * a + (1 - a)``."""
    arr = np.asarray(rgba, dtype=np.float64)
    if arr.shape[-1] != 4:
        raise ValueError(f"expected RGBA (..., 4), got shape {arr.shape}")
    alpha = arr[..., 3:4]
    return arr[..., :3] * alpha + (1.0 - alpha)


def _as_float(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


# --------------------------------------------------------------------------
# PSNR


def mse(img: np.ndarray, ref: np.ndarray) -> float:
    """Mean squared error over all elements of two same-shape images."""
    a, b = _as_float(img), _as_float(ref)
    _check_same_shape(a, b)
    return float(np.mean((a - b) ** 2))


def psnr(img: np.ndarray, ref: np.ndarray, max_val: float = 1.0) -> float:
    """PSNR in dB, ``10 log10(max_val^2 / MSE)``, of two same-shape images.

    Not capped: identical images give ``math.inf`` (as ``tf.image.psnr``).
    Does not quantize; :func:`score_view` does that first.
    """
    err = mse(img, ref)
    if err == 0.0:
        return math.inf
    return float(10.0 * np.log10(max_val**2 / err))


# --------------------------------------------------------------------------
# SSIM (tf.image.ssim)


def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """``(size,)`` normalised Gaussian taps centred on the middle tap.

    TensorFlow builds its 2-D window as a softmax over ``-(x^2 + y^2) / (2
    sigma^2)``, which is exactly the outer product of this 1-D kernel with
    itself, so filtering rows then columns with it is the same window.
    """
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-0.5 * coords**2 / sigma**2)
    return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of ``(H, W, C)``: ``(H-k+1, W-k+1, C)``."""
    k = taps.shape[0]
    h, w = x.shape[0] - k + 1, x.shape[1] - k + 1
    rows = sum(taps[i] * x[i:i + h] for i in range(k))
    return sum(taps[j] * rows[:, j:j + w] for j in range(k))


def ssim_map(
    img: np.ndarray,
    ref: np.ndarray,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Per-pixel SSIM over the valid region, ``(H-10, W-10, C)`` for 11 taps.

    The luminance term ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` times the
    contrast-structure term ``(2 s_xy + C2) / (s_x^2 + s_y^2 + C2)``, with the
    local (co)variances the Gaussian-weighted population ones, exactly as
    TensorFlow's ``_ssim_helper`` computes them.
    """
    a, b = _as_float(img), _as_float(ref)
    _check_same_shape(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    if a.shape[0] < filter_size or a.shape[1] < filter_size:
        raise ValueError(
            f"image {a.shape[0]}x{a.shape[1]} is smaller than the "
            f"{filter_size}x{filter_size} SSIM window"
        )
    taps = gaussian_kernel_1d(filter_size, filter_sigma)
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    mean_a = _filter_valid(a, taps)
    mean_b = _filter_valid(b, taps)
    num0 = 2.0 * mean_a * mean_b
    den0 = mean_a**2 + mean_b**2
    luminance = (num0 + c1) / (den0 + c1)
    num1 = 2.0 * _filter_valid(a * b, taps)
    den1 = _filter_valid(a * a + b * b, taps)
    contrast_structure = (num1 - num0 + c2) / (den1 - den0 + c2)
    return luminance * contrast_structure


def ssim(
    img: np.ndarray,
    ref: np.ndarray,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """SSIM of two ``(H, W, C)`` (or ``(H, W)``) images as ``tf.image.ssim``.

    Mean of :func:`ssim_map` over the valid region of each channel, then the
    mean over channels. Identical images give 1. Does not quantize.
    """
    smap = ssim_map(img, ref, max_val, filter_size, filter_sigma, k1, k2)
    return float(np.mean(smap.mean(axis=(0, 1))))


# --------------------------------------------------------------------------
# LPIPS


@contextlib.contextmanager
def _downloads_blocked() -> Iterator[None]:
    """Make any torch.hub download raise while the block runs."""
    import torch.hub

    saved = torch.hub.download_url_to_file

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"refusing to download {url}: building the LPIPS model never downloads")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = saved


@contextlib.contextmanager
def _hub_dir(path: str | None) -> Iterator[None]:
    import torch.hub

    if path is None:
        yield
        return
    saved = torch.hub.get_dir()
    torch.hub.set_dir(path)
    try:
        yield
    finally:
        torch.hub.set_dir(saved)


def downloads_allowed(no_download: bool = False) -> bool:
    """False with ``--no_download`` or when ``$NERF_NO_DOWNLOAD`` is set (not "" or "0")."""
    return not no_download and os.environ.get(NO_DOWNLOAD_ENV, "") in ("", "0")


def vgg16_weights_url() -> str:
    """Where torchvision gets the ImageNet VGG16 weights (``VGG16_Weights.IMAGENET1K_V1``).

    Imports ``torchvision.models``; raises whatever that import raises.
    """
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.url


def fetch_vgg16_weights(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` the way torchvision's model zoo does.

    ``torch.hub.download_url_to_file`` writes to a temporary file, checks the
    SHA-256 prefix that the file name carries (``vgg16-397923af.pth``) and
    renames it into place, so an interrupted fetch leaves no partial file.
    """
    import torch.hub

    log.info("LPIPS: fetching the VGG16 ImageNet weights %s into %s (once)", url, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = torch.hub.HASH_REGEX.search(dest.name)
    torch.hub.download_url_to_file(url, str(dest), digest.group(1) if digest else None, progress=True)


class LPIPSScorer:
    """LPIPS (``lpips`` package, VGG) loaded lazily.

    ``scorer.available`` says whether it can score and ``scorer.reason`` why
    not (``None`` when it can). Calling it on two ``(H, W, 3)`` images in
    [0, 1] (or uint8) returns the LPIPS distance as a float, or ``None`` when
    unavailable. The model is built once, on first use.

    ``hub_dir`` is the torch hub cache holding the VGG16 ImageNet weights
    (``<hub_dir>/checkpoints/``); default ``torch.hub.get_dir()``, i.e.
    ``$TORCH_HOME/hub``. When the file is missing it is fetched once from
    torchvision's URL (:func:`fetch_vgg16_weights`) unless ``download`` is
    False (default: :func:`downloads_allowed`); building the model itself
    never downloads anything.
    """

    def __init__(self, net: str = "vgg", device: str | None = None,
                 hub_dir: str | os.PathLike | None = None, download: bool | None = None) -> None:
        self.net_name = net
        self.device = device
        self.hub_dir = None if hub_dir is None else str(hub_dir)
        self.download = downloads_allowed() if download is None else download
        self._model: Any = None
        self._reason: str | None = None
        self._checked = False

    # Only looks at files: imports nothing heavy, touches no network.
    def _missing_package(self) -> str | None:
        lpips_spec = importlib.util.find_spec("lpips")
        if lpips_spec is None:
            return "the lpips package is not installed (pip install -r requirements.txt)"
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed (lpips needs it for VGG16)"
        locations = list(lpips_spec.submodule_search_locations or [])
        linear = [Path(p) / "weights" / "v0.1" / f"{self.net_name}.pth" for p in locations]
        if not any(p.is_file() for p in linear):
            return f"the lpips package has no linear-layer weights for net='{self.net_name}'"
        return None

    def _missing_vgg16(self) -> str | None:
        """Finds (or fetches) the VGG16 weights in the hub cache; the reason when it can't."""
        import torch
        import torch.hub

        try:
            url = vgg16_weights_url()
        except Exception as exc:
            return (f"torchvision cannot be imported ({type(exc).__name__}: {exc}); it must be the "
                    f"build made for the installed torch {torch.__version__}")
        hub = self.hub_dir if self.hub_dir is not None else torch.hub.get_dir()
        weights = Path(hub) / "checkpoints" / os.path.basename(url)
        if weights.is_file():
            return None
        if not self.download:
            return (f"VGG16 ImageNet weights not found at {weights} and downloads are off "
                    f"(--no_download or ${NO_DOWNLOAD_ENV}); put {url} there to enable LPIPS")
        try:
            fetch_vgg16_weights(url, weights)
        except Exception as exc:
            return (f"could not fetch the VGG16 ImageNet weights {url} into {weights} "
                    f"({type(exc).__name__}: {exc}); offline? put the file there by hand")
        return None

    def _load(self) -> None:
        self._checked = True
        self._reason = self._missing_package()
        if self._reason is None and self.net_name == "vgg":
            self._reason = self._missing_vgg16()
        if self._reason is not None:
            return
        try:
            import torch

            lpips = importlib.import_module("lpips")
            with _hub_dir(self.hub_dir), _downloads_blocked():
                model = lpips.LPIPS(net=self.net_name, verbose=False)
            if self.device is None:
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self._model = model.to(self.device).eval()
        except Exception as exc:  # report, never crash the training loop
            self._reason = f"loading lpips failed: {type(exc).__name__}: {exc}"
            self._model = None

    @property
    def available(self) -> bool:
        if not self._checked:
            self._load()
        return self._model is not None

    @property
    def reason(self) -> str | None:
        """Why LPIPS is unavailable, or None when it is available."""
        if not self._checked:
            self._load()
        return self._reason

    def __call__(self, img: np.ndarray, ref: np.ndarray) -> float | None:
        if not self.available:
            return None
        import torch

        a, b = _as_float(img), _as_float(ref)
        _check_same_shape(a, b)

        def to_tensor(x: np.ndarray) -> "torch.Tensor":
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            return (t.permute(2, 0, 1)[None] * 2.0 - 1.0).to(self.device)

        with torch.no_grad():
            dist = self._model(to_tensor(a), to_tensor(b))
        return float(dist.reshape(-1)[0])


_DEFAULT_LPIPS: dict[bool, LPIPSScorer] = {}


def default_lpips_scorer(download: bool | None = None) -> LPIPSScorer:
    """One shared VGG LPIPS scorer per process and download setting (built on
    first use); ``download`` defaults to :func:`downloads_allowed`."""
    download = downloads_allowed() if download is None else download
    if download not in _DEFAULT_LPIPS:
        _DEFAULT_LPIPS[download] = LPIPSScorer(download=download)
    return _DEFAULT_LPIPS[download]


# --------------------------------------------------------------------------
# Scoring views


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: render {a.shape} vs ground truth {b.shape}")


def prepare_ground_truth(gt: np.ndarray, white_bkgd: bool = False) -> np.ndarray:
    """``(H, W, 3|4)`` ground truth to ``(H, W, 3)`` RGB before quantizing.

    RGBA is alpha-matted onto white when ``white_bkgd`` and has its alpha
    dropped otherwise (what the loaders do); RGB is returned as is.
    """
    arr = _as_float(gt)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return composite_on_white(arr) if white_bkgd else arr[..., :3]
    return arr


def score_view(render: np.ndarray, gt: np.ndarray, name: str = "",
               lpips_scorer: LPIPSScorer | None = None,
               white_bkgd: bool = False) -> dict:
    """Scores of one ``(H, W, 3)`` render against its ``(H, W, 3|4)`` truth.

    Both are quantized to 8 bits first. Returns ``{"name", "psnr", "ssim",
    "lpips", "mse"}``; ``lpips`` is None when no available scorer is given.
    """
    r = quantize_8bit(render)
    g = quantize_8bit(prepare_ground_truth(gt, white_bkgd))
    _check_same_shape(r, g)
    lp = lpips_scorer(r, g) if lpips_scorer is not None else None
    return {"name": name, "psnr": psnr(r, g), "ssim": ssim(r, g),
            "lpips": lp, "mse": mse(r, g)}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals or len(vals) != len(values):
        return None
    return float(np.mean(vals))  # inf when any view is inf


def score_views(renders: Sequence[np.ndarray] | np.ndarray,
                gts: Sequence[np.ndarray] | np.ndarray,
                names: Sequence[str] | None = None,
                lpips_scorer: LPIPSScorer | None = None,
                white_bkgd: bool = False) -> dict:
    """Score N renders ``(N, H, W, 3)`` against N ground truths ``(N, H, W, 3|4)``.

    ``names`` defaults to the file names ``render_path`` saves,
    ``000.png``, ``001.png``, ... ``lpips_scorer`` defaults to the shared VGG
    scorer (:func:`default_lpips_scorer`). Returns ``{"views": [per-view
    dicts], "mean": {"psnr", "ssim", "lpips"}, "n_views", "lpips":
    {"available", "net", "reason"}}``.
    """
    n = len(renders)
    if n == 0:
        raise ValueError("no views to score")
    if len(gts) != n:
        raise ValueError(f"{n} renders but {len(gts)} ground-truth views")
    if names is None:
        names = [f"{k:03d}.png" for k in range(n)]
    if len(names) != n:
        raise ValueError(f"{n} renders but {len(names)} names")
    scorer = default_lpips_scorer() if lpips_scorer is None else lpips_scorer
    active = scorer if scorer.available else None
    views = [score_view(renders[k], gts[k], str(names[k]), active, white_bkgd)
             for k in range(n)]
    mean = {key: _mean([v[key] for v in views]) for key in ("psnr", "ssim", "lpips")}
    return {
        "n_views": n,
        "views": views,
        "mean": mean,
        "lpips": {"available": active is not None, "net": scorer.net_name,
                  "reason": scorer.reason},
    }


# --------------------------------------------------------------------------
# metrics.json


def _jsonable(value: Any) -> Any:
    """Strict-JSON copy: +inf becomes "inf" (see module docstring)."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return None
        return value
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def _from_json(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def scene_from_datadir(datadir: str | os.PathLike) -> str:
    """Scene name from a data folder: ``./data/nerf_llff_data/fern`` -> ``fern``."""
    return os.path.basename(os.path.normpath(str(datadir)))


def render_files(folder: str | os.PathLike) -> list[str]:
    """The render PNGs ``render_path`` saved in ``folder`` (``000.png`` ...), sorted."""
    return sorted(f for f in os.listdir(folder) if _RENDER_NAME.match(f))


def write_metrics_json(folder: str | os.PathLike, step: int,
                       gts: Sequence[np.ndarray] | np.ndarray,
                       renders: Sequence[np.ndarray] | np.ndarray | None = None,
                       names: Sequence[str] | None = None, **fields: Any) -> dict:
    """Score a test folder and write ``<folder>/metrics.json``; return its content.

    ``renders``: ``(N, H, W, 3)`` in [0, 1]; when None, the PNGs in
    ``folder`` are read (``names``, default every ``NNN.png`` there, sorted).
    The other arguments are :func:`metrics_result`'s. The file is replaced
    whole or not at all (:func:`save_metrics_json`).
    """
    folder = Path(folder)
    if renders is None:
        import imageio.v2 as imageio

        if names is None:
            names = render_files(folder)
        renders = [imageio.imread(folder / name) for name in names]
        renders = [r[..., :3] if r.ndim == 3 else r for r in renders]
    result = metrics_result(step, gts, renders, names, **fields)
    save_metrics_json(folder, result)
    return result


def metrics_result(step: int, gts: Sequence[np.ndarray] | np.ndarray,
                   renders: Sequence[np.ndarray] | np.ndarray,
                   names: Sequence[str] | None = None, *,
                   scene: str, dataset_type: str,
                   H: int | None = None, W: int | None = None,
                   white_bkgd: bool = False,
                   lpips_scorer: LPIPSScorer | None = None,
                   gt_names: Sequence[str] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict:
    """The content of a ``metrics.json``: the renders' scores and what they are.

    ``gts``: ``(N, H, W, 3|4)`` ground truth in [0, 1] (RGBA is matted on
    white when ``white_bkgd``). ``renders``: ``(N, H, W, 3)`` in [0, 1].
    ``names`` are the render file names recorded per view (default
    ``000.png`` ...). ``H``/``W`` default to the renders' size and must match
    it when given. ``extra`` adds fields (e.g. factor, half_res, expname).
    """
    if len(renders) == 0:
        raise ValueError("no renders to score")
    rh, rw = np.shape(renders[0])[:2]
    if (H is not None and H != rh) or (W is not None and W != rw):
        raise ValueError(f"renders are {rw}x{rh} but H, W = {H}, {W} were given")
    scores = score_views(renders, gts, names, lpips_scorer, white_bkgd)
    if gt_names is not None:
        if len(gt_names) != scores["n_views"]:
            raise ValueError(f"{len(gt_names)} gt_names for {scores['n_views']} views")
        for view, gname in zip(scores["views"], gt_names):
            view["gt"] = str(gname)
    return {
        "format": FORMAT,
        "step": int(step),
        "scene": scene,
        "dataset_type": dataset_type,
        "H": int(rh),
        "W": int(rw),
        "white_bkgd": bool(white_bkgd),
        "convention": CONVENTION,
        **scores,
        **(dict(extra) if extra else {}),
    }


def save_metrics_json(folder: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """``<folder>/metrics.json`` (the folder made if needed), replaced whole or
    not at all; ``outputs.WriteError`` when the OS refuses. Returns its path."""
    from outputs import atomic_path, make_folder

    target = make_folder(folder) / METRICS_FILENAME
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        json.dump(_jsonable(result), f, indent=2, allow_nan=False)
        f.write("\n")
    return target


def load_metrics(path: str | os.PathLike) -> dict:
    """Read a ``metrics.json`` (a file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    with open(path) as f:
        return _from_json(json.load(f))


# --------------------------------------------------------------------------
# Reporting


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def summary_line(metrics: Mapping[str, Any]) -> str:
    """One line: ``[TEST] step 200000 fern (llff 504x378, 3 views) PSNR ...``."""
    mean = metrics["mean"]
    line = (
        f"[TEST] step {metrics.get('step', '?')} {metrics.get('scene', '?')} "
        f"({metrics.get('dataset_type', '?')} {metrics.get('W', '?')}x{metrics.get('H', '?')}, "
        f"{metrics.get('n_views', len(metrics.get('views', [])))} views) "
        f"PSNR {_fmt(mean.get('psnr'), 2)} SSIM {_fmt(mean.get('ssim'), 4)} "
        f"LPIPS {_fmt(mean.get('lpips'), 4)}"
    )
    lp = metrics.get("lpips") or {}
    if mean.get("lpips") is None and lp.get("reason"):
        line += f" ({lp['reason']})"
    return line


def tensorboard_scalars(metrics: Mapping[str, Any], prefix: str = "test") -> dict[str, float]:
    """``{"test/psnr": ..., "test/ssim": ..., "test/lpips": ...}`` of the means.

    LPIPS is left out when unavailable; for ``writer.add_scalar(tag, value, step)``.
    """
    out = {}
    for key in ("psnr", "ssim", "lpips"):
        value = metrics["mean"].get(key)
        if value is not None:
            out[f"{prefix}/{key}"] = float(value)
    return out


# --------------------------------------------------------------------------
# Comparison images


def error_colormap(t: np.ndarray) -> np.ndarray:
    """``(...)`` values in [0, 1] to ``(..., 3)`` uint8, black-red-yellow-white.

    Red rises over the first third, green over the second, blue over the last,
    so brightness grows with the value.
    """
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * t - k, 0.0, 1.0) for k in range(3)], axis=-1)
    return np.round(255 * rgb).astype(np.uint8)


def comparison_image(render: np.ndarray, gt: np.ndarray, err_max: float = 0.2,
                     white_bkgd: bool = False) -> np.ndarray:
    """``(H, 3W, 3)`` uint8: render | ground truth | error heat map.

    The heat map is the per-pixel absolute error of the 8-bit images,
    averaged over channels, on a fixed scale: 0 is black and ``err_max`` or
    more is white, so maps of different views and runs compare directly.
    """
    r8 = to_uint8(render)
    g8 = to_uint8(prepare_ground_truth(gt, white_bkgd))
    if r8.ndim == 2:
        r8, g8 = np.repeat(r8[..., None], 3, -1), np.repeat(g8[..., None], 3, -1)
    _check_same_shape(r8, g8)
    err = np.abs(r8.astype(np.float64) - g8.astype(np.float64)).mean(axis=-1) / 255.0
    heat = error_colormap(err / err_max)
    return np.concatenate([r8[..., :3], g8[..., :3], heat], axis=1)


def save_comparisons(folder: str | os.PathLike,
                     renders: Sequence[np.ndarray] | np.ndarray,
                     gts: Sequence[np.ndarray] | np.ndarray,
                     names: Sequence[str] | None = None,
                     err_max: float = 0.2, white_bkgd: bool = False) -> list[Path]:
    """Write ``<folder>/compare/<name>`` for each view; return the paths."""
    from outputs import make_folder, write_image

    if len(renders) != len(gts):
        raise ValueError(f"{len(renders)} renders but {len(gts)} ground-truth views")
    if names is None:
        names = [f"{k:03d}.png" for k in range(len(renders))]
    out_dir = make_folder(Path(folder) / "compare")
    paths = []
    for render, gt, name in zip(renders, gts, names):
        path = out_dir / name
        write_image(path, comparison_image(render, gt, err_max, white_bkgd))
        paths.append(path)
    return paths
