#!/usr/bin/env python3
"""Camera poses for your own photos, written as LLFF ``poses_bounds.npy`` and as a ``transforms.json``.

    python imgs2poses.py <scenedir>                 # reconstruct with pycolmap
    python imgs2poses.py <scenedir> --sparse <dir>  # convert an existing COLMAP model

``<scenedir>/images/`` holds the photos (.jpg, .jpeg, .png, any case). Without
``--sparse`` this runs COLMAP's feature extraction, matching and incremental
mapping through ``pycolmap`` (``pip install -r requirements-colmap.txt``),
writing ``<scenedir>/database.db`` and the model ``<scenedir>/sparse/0`` as the
LLFF tool does. It then writes into ``<scenedir>``:

* ``poses_bounds.npy``: (N, 17), one row per registered image, sorted by name;
* ``poses_names.txt``: those N image names, one per line, in row order;
* ``unregistered.txt``: only when some photos did not register, their names;
* ``transforms.json``: the same cameras in nerfstudio's / instant-ngp's format
  with the full intrinsics (fl_x, fl_y, cx, cy, camera_model and k1, k2, k3,
  k4, p1, p2; see nerf/load_transforms.py), the bounds near, far (from the
  depths of the points each image observes) and ``ply_file_path``, for
  ``--dataset_type nerfstudio``;
* ``sparse_pc.ply``: the model's 3D points (as nerfstudio writes them);
* ``undistorted/``: when the camera model has distortion, the registered photos
  undistorted to a pinhole camera (nerf/undistort.py, NumPy), as training
  with ``--dataset_type nerfstudio`` reads them.

``--camera_model`` is any of SUPPORTED_MODELS (nerf/colmap_model.py): the
pinhole, radial, OpenCV and fisheye models. ``poses_bounds.npy`` keeps one
focal length (distortion and principal point dropped, as the LLFF tool);
``transforms.json`` keeps everything.

The NeRF loader reads ``poses_names.txt`` to load exactly the registered photos,
so unregistered ones are left out of training instead of being mis-paired.
"""
from __future__ import annotations

import nerf.omp_wait  # noqa: F401 (first: OpenMP reads its wait policy when torch loads)
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from nerf.colmap_model import (SUPPORTED_MODELS, ColmapModelError, find_model_format, model_to_poses_bounds,
                               model_to_transforms, read_model)
from nerf.errors import DataError
from nerf.load_transforms import TRANSFORMS, read_capture
from nerf.sparse_points import write_ply_points
from nerf.undistort import undistorted_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
POINTS = "sparse_pc.ply"
INSTALL_HINT = "pip install -r requirements-colmap.txt"


class CliError(Exception):
    """Ends the program with ``error: <where>: <what>`` and exit status 2."""

    def __init__(self, where: str | Path, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = str(where)
        self.what = what


def list_images(images_dir: Path) -> list[str]:
    """Sorted file names of the photos (.jpg/.jpeg/.png, any case) in ``images_dir``."""
    return sorted(p.name for p in images_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def import_pycolmap():
    """The pycolmap module, or a CliError saying how to install it."""
    try:
        import pycolmap
    except ImportError:
        raise CliError("pycolmap", f"not installed; it is needed to reconstruct without --sparse: "
                                   f"run '{INSTALL_HINT}', or pass --sparse <model dir>") from None
    return pycolmap


def reconstruct(scenedir: Path, image_names: Sequence[str], args: argparse.Namespace) -> Path:
    """Run feature extraction, matching and incremental mapping with pycolmap.

    Writes ``<scenedir>/database.db`` and the largest reconstruction, in
    COLMAP's binary format, to ``<scenedir>/sparse/0``; returns that folder.
    """
    database = scenedir / "database.db"
    sparse = scenedir / "sparse" / "0"
    for existing in (database, sparse):
        if existing.exists():
            raise CliError(existing, "exists from an earlier reconstruction; pass '--sparse "
                                     f"{sparse}' to reuse it, or delete {database.name} and sparse/ to start over")
    pycolmap = import_pycolmap()
    if not args.verbose:
        pycolmap.logging.minloglevel = 2  # COLMAP's own log: errors only
    pycolmap.set_random_seed(args.seed)
    images_dir = scenedir / "images"
    threads = args.num_threads

    start = time.time()
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = args.camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = threads
    extraction.max_image_size = args.max_image_size
    extraction.sift.max_num_features = args.max_num_features
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    try:
        print(f"Extracting features from {len(image_names)} images ...", flush=True)
        pycolmap.extract_features(database, images_dir, image_names=list(image_names),
                                  camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                                  extraction_options=extraction)
        print(f"Matching features ({args.match_type}) ...", flush=True)
        if args.match_type == "exhaustive_matcher":
            pycolmap.match_exhaustive(database, matching_options=matching)
        else:
            pycolmap.match_sequential(database, matching_options=matching)
    except (RuntimeError, ValueError) as err:
        raise CliError(images_dir, f"COLMAP failed: {err}") from None

    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = threads
    mapping.extract_colors = False
    # COLMAP's defaults otherwise. Unlike the LLFF tool's mapper call we keep
    # init_min_tri_angle at 16 degrees (its 4 picked a poor initial pair on
    # fern: 2 of 20 photos registered) and multiple_models on, so that when an
    # initial pair leads nowhere COLMAP starts again from another one; we keep
    # the largest model. A capture of 3+ photos still gives a model (default 10).
    mapping.min_model_size = 3
    mapping.random_seed = args.seed
    print("Mapping (incremental) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=scenedir) as tmp:
        try:
            models = pycolmap.incremental_mapping(database, images_dir, tmp, options=mapping)
        except (RuntimeError, ValueError) as err:
            raise CliError(images_dir, f"COLMAP mapping failed: {err}") from None
        if not models:
            raise CliError(images_dir, "COLMAP could not reconstruct these photos (no two photos gave a "
                                       "usable initial pair): they need more overlap and texture")
        best = max(models.values(), key=lambda rec: rec.num_reg_images())
        if len(models) > 1:
            print(f"warning: COLMAP built {len(models)} separate models; keeping the largest "
                  f"({best.num_reg_images()} images), the photos of the others count as unregistered",
                  file=sys.stderr)
        sparse.mkdir(parents=True)
        best.write(sparse)
    print(f"Reconstructed {best.num_reg_images()} of {len(image_names)} images, "
          f"{best.num_points3D()} points, in {time.time() - start:.1f} s -> {sparse}", flush=True)
    return sparse


def resolve_sparse(path: Path) -> Path:
    """The model folder named by --sparse; ``sparse`` with a single ``0/`` inside also works."""
    if not path.is_dir():
        raise CliError("--sparse", f"{path}: no such folder")
    if find_model_format(path) is None and find_model_format(path / "0") is not None:
        return path / "0"
    return path


def write_outputs(scenedir: Path, poses_bounds: np.ndarray, names: Sequence[str],
                  unregistered: Sequence[str]) -> None:
    """Write poses_bounds.npy, poses_names.txt and (only if needed) unregistered.txt.

    A stale unregistered.txt from an earlier run is removed when every image registered.
    """
    np.save(scenedir / "poses_bounds.npy", poses_bounds)
    (scenedir / "poses_names.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    unreg_file = scenedir / "unregistered.txt"
    if unregistered:
        unreg_file.write_text("".join(f"{n}\n" for n in unregistered), encoding="utf-8")
    elif unreg_file.exists():
        unreg_file.unlink()


def undistort(scenedir: Path) -> None:
    """The photos of scenedir/transforms.json undistorted into scenedir/undistorted/ when its camera has
    distortion; where the capture cannot be trained here as it is (photos of another size than the model's
    cameras, several cameras), a warning says why and nothing is undistorted."""
    try:
        capture = read_capture(scenedir)
        if not capture.camera.distorted:
            return
        files, pinhole = undistorted_files(capture)
    except DataError as err:
        print(f"warning: images not undistorted: {err}", file=sys.stderr)
        return
    print(f"Undistorted {len(files)} images ({capture.camera.model}) into {files[0].parent}: pinhole "
          f"fx {pinhole.fx:.1f}, fy {pinhole.fy:.1f}, cx {pinhole.cx:.1f}, cy {pinhole.cy:.1f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Estimate camera poses of <scenedir>/images/* with COLMAP (pycolmap) and write "
                    "LLFF poses_bounds.npy, poses_names.txt (and unregistered.txt) into <scenedir>.")
    parser.add_argument("scenedir", type=Path, help="scene folder holding images/")
    parser.add_argument("--sparse", type=Path, default=None, metavar="DIR",
                        help="existing COLMAP sparse model folder (binary or text) to convert instead of "
                             "reconstructing")
    parser.add_argument("--match_type", default="exhaustive_matcher",
                        choices=["exhaustive_matcher", "sequential_matcher"],
                        help="exhaustive for unordered photos (default); sequential for video frames")
    parser.add_argument("--camera_model", default="SIMPLE_RADIAL", choices=list(SUPPORTED_MODELS),
                        help="camera model for all photos (one shared camera, as the LLFF tool); models with "
                             "distortion give undistorted images (see transforms.json)")
    parser.add_argument("--max_num_features", type=int, default=8192, metavar="N", help="SIFT features per image")
    parser.add_argument("--max_image_size", type=int, default=3200, metavar="N",
                        help="photos are downscaled to this longest side for feature extraction")
    parser.add_argument("--num_threads", type=int, default=-1, metavar="N", help="CPU threads (-1: all)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed for COLMAP (runs with several threads may still differ slightly)")
    parser.add_argument("--verbose", action="store_true", help="show COLMAP's own log")
    return parser


def run(args: argparse.Namespace) -> int:
    scenedir: Path = args.scenedir
    if not scenedir.is_dir():
        raise CliError(scenedir, "no such folder")
    images_dir = scenedir / "images"
    if not images_dir.is_dir():
        raise CliError(images_dir, "no such folder; put the photos in <scenedir>/images/")
    image_names = list_images(images_dir)
    if not image_names:
        raise CliError(images_dir, f"no photos ({', '.join(IMAGE_EXTENSIONS)}) found")

    sparse = resolve_sparse(args.sparse) if args.sparse is not None else \
        reconstruct(scenedir, image_names, args)
    model = read_model(sparse)

    in_folder = set(image_names)
    missing = sorted(im.name for im in model.images.values() if im.name not in in_folder)
    if missing and len(missing) == len(model.images):
        raise CliError(sparse, f"none of its {len(missing)} images (e.g. {missing[0]}) is in {images_dir}")
    if missing:
        print(f"warning: ignoring {len(missing)} image(s) of the model that are not in {images_dir}: "
              f"{', '.join(missing)}", file=sys.stderr)

    poses_bounds, names = model_to_poses_bounds(model, image_names)
    transforms = model_to_transforms(model, poses_bounds, names)
    registered = set(names)
    unregistered = [n for n in image_names if n not in registered]
    write_outputs(scenedir, poses_bounds, names, unregistered)
    write_ply_points(scenedir / POINTS, model.points3d.xyz, model.points3d.rgb)
    transforms["ply_file_path"] = POINTS
    (scenedir / TRANSFORMS).write_text(json.dumps(transforms, indent=1), encoding="utf-8")
    undistort(scenedir)

    focals = poses_bounds[:, 14]
    if np.ptp(focals) > 0.01 * focals.min():
        print(f"warning: focal lengths differ between images ({focals.min():.1f} to {focals.max():.1f} px); "
              "NeRF uses a single focal length (the first image's)", file=sys.stderr)
    if unregistered:
        print(f"warning: {len(unregistered)} of {len(image_names)} images did not register and are "
              f"excluded from training: {', '.join(unregistered)} (listed in {scenedir / 'unregistered.txt'})",
              file=sys.stderr)
    near, far = poses_bounds[:, 15].min(), poses_bounds[:, 16].max()
    print(f"Wrote {scenedir / 'poses_bounds.npy'} ({len(names)} images, H x W = "
          f"{int(poses_bounds[0, 4])} x {int(poses_bounds[0, 9])}, focal {focals[0]:.1f}, "
          f"depths {near:.3g} to {far:.3g}), {scenedir / 'poses_names.txt'} and {scenedir / TRANSFORMS}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on any user-facing error)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as err:
        print(f"error: {err.where}: {err.what}", file=sys.stderr)
    except ColmapModelError as err:
        print(f"error: {err.path}: {err.message}", file=sys.stderr)
    except OSError as err:
        where = err.filename if err.filename else "imgs2poses"
        print(f"error: {where}: {err.strerror or err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
