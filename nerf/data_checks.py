"""The data folder checked before any image is decoded: the scene a run names exists and holds what its loader reads.

`check_data` reads file headers only: LLFF `poses_bounds.npy` (N x 17,
finite, positive bounds, N equal to the image count), Blender/LINEMOD
`transforms_*.json` and nerfstudio's `transforms.json` (fields, 4x4
matrices, every frame that will be read exists), images readable and of one size; and `--N_rand` against the pixels
`--no_batching` draws from without replacement. Every problem is one
`DataError(where, what)`.
"""
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from nerf.errors import DataError
from load_blender import SPLITS, frame_file, read_transforms
from nerf.load_transforms import downscaled_file, held_out_split, read_capture
from load_llff import _select_registered, list_images


def check_data(args) -> Optional[Tuple[int, int]]:
    """Checks the scene that `args` names without decoding any image; returns
    the training images' (H, W) as the loader will give them. The demo scene
    is made first if it is not there yet."""
    datadir = Path(args.datadir)
    if args.dataset_type == "demo":
        from nerf.demo_scene import ensure_demo_scene
        ensure_demo_scene(datadir)
    if not datadir.is_dir():
        raise DataError(datadir, "data folder does not exist" + how_to_get(datadir)
                        if not datadir.exists() else "is not a folder")
    if args.dataset_type == "llff":
        H, W = _check_llff(datadir, args.factor, args.llffhold, needs_training=not args.render_only)
    elif args.dataset_type in ("blender", "demo", "LINEMOD"):
        H, W = _check_transforms(datadir, args.testskip, args.half_res, linemod=args.dataset_type == "LINEMOD")
    elif args.dataset_type == "nerfstudio":
        H, W = _check_capture(datadir, args.factor, args.llffhold)
    else:
        H, W = _check_deepvoxels(datadir, args.shape, args.testskip)
    if args.no_batching and not args.render_only:
        _check_ray_count(args, H, W)
    return H, W


EXAMPLE_SCENES = ("fern", "lego")      # what download_example_data.sh fetches
RELEASED_SCENES = {"nerf_llff_data": ("fern", "flower", "fortress", "horns", "leaves", "orchids", "room", "trex"),
                   "nerf_synthetic": ("chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship")}


def how_to_get(datadir: Path) -> str:
    """Where a missing scene of the shipped configs comes from, as a clause
    to append to the error ("" for other folders)."""
    release, scene = Path(datadir).parent.name, Path(datadir).name
    if scene not in RELEASED_SCENES.get(release, ()):
        return ""
    if scene in EXAMPLE_SCENES:
        return "; run `bash download_example_data.sh` to fetch it (the example scenes fern and lego)"
    return (f"; {scene} is in {release}.zip of the NeRF authors' data release (see README): unzip it into "
            f"{Path(datadir).parent.parent}")


def image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the header; the file's structure is verified
    (a truncated PNG fails) but no pixel is decoded."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = text.replace(str(path), "").replace("''", "").strip(" :")
        raise DataError(path, f"unreadable image ({exc.__class__.__name__}{': ' + text if text else ''})") from None
    return size


def _same_size(files: Sequence[Path]) -> Tuple[int, int]:
    """All files' (width, height), which must agree; returns it."""
    first = None
    for f in files:
        size = image_size(f)
        if first is None:
            first = size
        elif size != first:
            raise DataError(f, f"is {size[0]}x{size[1]}, the first image is {first[0]}x{first[1]}")
    return first


def _check_llff(datadir: Path, factor: int, llffhold: int, needs_training: bool) -> Tuple[int, int]:
    poses_file = datadir / "poses_bounds.npy"
    if not poses_file.is_file():
        raise DataError(poses_file, "missing")
    try:
        arr = np.load(poses_file, allow_pickle=False)
    except Exception as exc:
        raise DataError(poses_file, f"not a readable .npy array ({exc.__class__.__name__})") from None
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise DataError(poses_file, f"has shape {arr.shape}, expected N x 17")
    if arr.shape[0] == 0:
        raise DataError(poses_file, "has no rows (no cameras)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(poses_file, f"holds {arr.dtype} values, expected real numbers")
    if not np.isfinite(arr).all():
        raise DataError(poses_file, f"row {int(np.argwhere(~np.isfinite(arr))[0, 0])} holds NaN or inf")
    if (arr[:, -2:] <= 0).any():
        raise DataError(poses_file, f"row {int(np.argwhere(arr[:, -2:] <= 0)[0, 0])} has a depth bound <= 0")

    imgdir = datadir / f"images_{factor}" if factor != 1 else datadir / "images"
    scale = 1
    if not imgdir.is_dir() and factor != 1:
        # the loader makes images_<factor>/ from images/
        imgdir, scale = datadir / "images", factor
        if not imgdir.is_dir():
            raise DataError(imgdir, f"missing (needed to make images_{factor}/)")
    if not imgdir.is_dir():
        raise DataError(imgdir, "missing")
    files = _select_registered(datadir, list_images(imgdir))
    if len(files) != arr.shape[0]:
        raise DataError(poses_file, f"has {arr.shape[0]} poses but {imgdir} has {len(files)} images")
    w, h = _same_size(files)
    if scale != 1:
        w, h = max(1, round(w / scale)), max(1, round(h / scale))
    n = arr.shape[0]
    held_out = len(range(0, n, llffhold)) if llffhold > 0 else 1
    if needs_training and held_out >= n:
        raise DataError("--llffhold", f"{llffhold} holds out all {n} images as test views; none is left to train on")
    return h, w


def _check_transforms(datadir: Path, testskip: int, half_res: bool, linemod: bool) -> Tuple[int, int]:
    files = []
    metas = {}
    for split in SPLITS:
        meta = read_transforms(datadir, split)
        metas[split] = meta
        name = f"transforms_{split}.json"
        if not linemod:
            angle = meta.get("camera_angle_x")
            if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 < angle < math.pi:
                raise DataError(datadir / name, "has no 'camera_angle_x' (a number in (0, pi))"
                                if angle is None else f"'camera_angle_x' is {angle!r}, expected a number in (0, pi)")
        for k, frame in enumerate(meta["frames"]):
            if not isinstance(frame["file_path"], str):
                raise DataError(datadir / name, f"frame {k}: 'file_path' is not a string")
            try:
                matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
            except (TypeError, ValueError):
                matrix = None
            if matrix is None or not np.isfinite(matrix).all():
                raise DataError(datadir / name, f"frame {k}: 'transform_matrix' holds a value that is not a number")
        skip = 1 if split == "train" or testskip == 0 else testskip
        for frame in meta["frames"][::skip]:
            path = frame_file(datadir, frame["file_path"], "" if linemod else ".png")
            if not path.is_file():
                raise DataError(path, f"missing (referenced by {name})")
            files.append(path)
    if linemod:
        for split in ("train", "test"):
            for key in ("near", "far"):
                if not isinstance(metas[split].get(key), (int, float)):
                    raise DataError(datadir / f"transforms_{split}.json", f"has no numeric '{key}'")
        if np.shape(metas["test"]["frames"][0].get("intrinsic_matrix")) not in ((3, 3), (4, 4)):
            raise DataError(datadir / "transforms_test.json", "frame 0 has no 3x3 or 4x4 'intrinsic_matrix'")
    w, h = _same_size(files)
    return (h // 2, w // 2) if half_res else (h, w)


def _check_capture(datadir: Path, factor: int, llffhold: int) -> Tuple[int, int]:
    """transforms.json (see nerf/load_transforms.py): every frame's fields,
    matrix and image header; the (H, W) the loader gives at `factor`."""
    capture = read_capture(datadir)
    if capture.splits is None:
        held_out_split(len(capture.files), llffhold)
    w, h = capture.camera.w, capture.camera.h
    if factor > 1 and not capture.camera.distorted and downscaled_file(capture.files[0], factor) is not None:
        w, h = _same_size([downscaled_file(f, factor) or f for f in capture.files])
        return h, w
    return (h // factor, w // factor) if factor > 1 else (h, w)


def _check_deepvoxels(datadir: Path, shape: str, testskip: int) -> Tuple[int, int]:
    intrinsics = datadir / "train" / shape / "intrinsics.txt"
    if not intrinsics.is_file():
        raise DataError(intrinsics, "missing")
    files = []
    for split in ("train", "validation", "test"):
        folder = datadir / split / shape
        counts = {}
        for sub, ext in (("rgb", ".png"), ("pose", ".txt")):
            if not (folder / sub).is_dir():
                raise DataError(folder / sub, "missing")
            counts[sub] = len([f for f in os.listdir(folder / sub) if f.endswith(ext)])
        if counts["rgb"] != counts["pose"] or counts["rgb"] == 0:
            raise DataError(folder, f"has {counts['rgb']} images in rgb/ and {counts['pose']} poses in pose/")
        names = sorted(f for f in os.listdir(folder / "rgb") if f.endswith(".png"))
        files += [folder / "rgb" / f for f in names[::1 if split == "train" else testskip or 1]]
    w, h = _same_size(files)
    return h, w


def _check_ray_count(args, H: int, W: int) -> None:
    """--no_batching draws N_rand pixels of one image without replacement, from
    the centre crop during the first precrop_iters steps."""
    if args.precrop_iters > 0:
        ch, cw = 2 * int(H // 2 * args.precrop_frac), 2 * int(W // 2 * args.precrop_frac)
        if ch * cw == 0:
            raise DataError("--precrop_frac", f"{args.precrop_frac} leaves an empty centre crop of the {W}x{H} images")
        if args.N_rand > ch * cw:
            raise DataError("--N_rand", f"{args.N_rand} rays per step, but --no_batching draws without replacement "
                                        f"from the {cw}x{ch} = {ch * cw} pixels of the centre crop "
                                        f"(--precrop_frac {args.precrop_frac}, first {args.precrop_iters} steps)")
    if args.N_rand > H * W:
        raise DataError("--N_rand", f"{args.N_rand} rays per step, but --no_batching draws without replacement "
                                    f"from the {W}x{H} = {H * W} pixels of one image")
