"""A test set's scores: each view scored, the means, ``metrics.json``, summaries and comparison images.

Each view is scored on its own (:mod:`nerf.metrics` for PSNR and SSIM,
:mod:`nerf.lpips_vgg` for LPIPS) and the means are plain means over views.
Because strict JSON has no infinity, ``metrics.json`` stores an infinite PSNR
(a render identical to its ground truth) as the string ``"inf"``;
:func:`load_metrics` turns it back into ``math.inf``.

Shapes: an image is ``(H, W, C)`` (or ``(H, W)``), floats in [0, 1] or uint8;
a set of views is ``(N, H, W, C)`` or a sequence of images.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nerf.lpips_vgg import LPIPSScorer, default_lpips_scorer
from nerf.metrics import as_float, check_same_shape, composite_on_white, mse, psnr, quantize_8bit, ssim, to_uint8

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
_RENDER_NAME = re.compile(r"^\d+\.png$")


def prepare_ground_truth(gt: np.ndarray, white_bkgd: bool = False) -> np.ndarray:
    """``(H, W, 3|4)`` ground truth to ``(H, W, 3)`` RGB before quantizing.

    RGBA is alpha-matted onto white when ``white_bkgd`` and has its alpha
    dropped otherwise (what the loaders do); RGB is returned as is.
    """
    arr = as_float(gt)
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
    check_same_shape(r, g)
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
    from nerf.outputs import atomic_path, make_folder

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


def summary_line(metrics: Mapping[str, Any], reason: bool = True) -> str:
    """One line: ``[TEST] step 200000 fern (llff 504x378, 3 views) PSNR ...``;
    with `reason`, why LPIPS is n/a where it is."""
    mean = metrics["mean"]
    line = (
        f"[TEST] step {metrics.get('step', '?')} {metrics.get('scene', '?')} "
        f"({metrics.get('dataset_type', '?')} {metrics.get('W', '?')}x{metrics.get('H', '?')}, "
        f"{metrics.get('n_views', len(metrics.get('views', [])))} views) "
        f"PSNR {_fmt(mean.get('psnr'), 2)} SSIM {_fmt(mean.get('ssim'), 4)} "
        f"LPIPS {_fmt(mean.get('lpips'), 4)}"
    )
    lp = metrics.get("lpips") or {}
    if reason and mean.get("lpips") is None and lp.get("reason"):
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
    check_same_shape(r8, g8)
    err = np.abs(r8.astype(np.float64) - g8.astype(np.float64)).mean(axis=-1) / 255.0
    heat = error_colormap(err / err_max)
    return np.concatenate([r8[..., :3], g8[..., :3], heat], axis=1)


def save_comparisons(folder: str | os.PathLike,
                     renders: Sequence[np.ndarray] | np.ndarray,
                     gts: Sequence[np.ndarray] | np.ndarray,
                     names: Sequence[str] | None = None,
                     err_max: float = 0.2, white_bkgd: bool = False) -> list[Path]:
    """Write ``<folder>/compare/<name>`` for each view; return the paths."""
    from nerf.outputs import make_folder, write_image

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
