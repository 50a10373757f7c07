#!/usr/bin/env python3
"""The figures of docs/own_photos.md: lego through --dataset_type nerfstudio, cropped off-centre, and with the
principal point ignored, each trained like the Blender loader's run (same steps, seed and small network).

    OMP_NUM_THREADS=1 python scripts/measure_captures.py --lego data/nerf_synthetic/lego --out /tmp/captures \
        --steps 1000

    OMP_NUM_THREADS=1 python scripts/measure_captures.py --fern data/nerf_llff_data/fern --out /tmp/fern \
        --steps 600

With --lego, runs (in parallel, one process each): `blender` (the Blender loader, half_res), `transforms` (the same frames as a
transforms.json, --factor 2), `crop` (every image cropped to rows [0, 600), columns [200, 800) at full size, so at
half size cx, cy = 100, 200 instead of the centre's 150, 150: 50 px off on each axis), `crop_centred` (the same
images with cx, cy written as the centre: the principal point ignored). Prints one JSON line per run: the test
PSNR the run reports, and the PSNR of its renders over the crop window (rows [0, 300), columns [100, 400) of the
half-size uncropped renders), so the cropped and uncropped runs are scored on the same pixels.

With --fern, the forward-facing capture without bounds: `llff_no_ndc` (the LLFF loader, --factor 8 --no_ndc:
Euclidean samples between COLMAP's bounds) and `fern_transforms` (the same images_8 frames and poses as a
transforms.json with no near/far and no points, so the bounds come from the cameras alone), both with fern's
config (64 + 64 samples, 4x64 networks, 512 rays, seed 0) and its llffhold 8 test frames. Prints each run's
test PSNR.
"""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "val", "test")
CROP = (0, 200, 600, 600)          # rows from, columns from, height, width at full size (800 x 800)


def blender_as_transforms(lego: Path, out: Path, testskip: int = 40, crop=None, centre_crop_camera: bool = False,
                          bounds: bool = True) -> Path:
    """lego's three transforms_<split>.json as one nerfstudio transforms.json in `out` (images linked), with
    explicit splits: the frames the Blender loader reads at `testskip`. `crop` (r0, c0, h, w) at full size
    writes cropped copies and moves cx, cy by (c0, r0); `centre_crop_camera` then writes the image centre
    instead (the principal point ignored). `bounds`: Blender's near 2, far 6 in the file."""
    out.mkdir(parents=True, exist_ok=True)
    frames, names, angle = [], {s: [] for s in SPLITS}, None
    for split in SPLITS:
        meta = json.loads((lego / f"transforms_{split}.json").read_text())
        angle = meta["camera_angle_x"]
        if crop is None and not (out / split).exists():
            os.symlink(lego / split, out / split)
        for frame in meta["frames"][::1 if split == "train" else testskip]:
            name = frame["file_path"].lstrip("./") + ".png"
            if crop is not None:
                (out / split).mkdir(exist_ok=True)
                r0, c0, h, w = crop
                if not (out / name).exists():
                    iio.imwrite(out / name, iio.imread(lego / name)[r0:r0 + h, c0:c0 + w])
            frames.append({"file_path": name, "transform_matrix": frame["transform_matrix"]})
            names[split].append(name)
    meta = {"camera_angle_x": angle, "frames": frames, **{f"{s}_filenames": names[s] for s in SPLITS}}
    if crop is not None:
        r0, c0, h, w = crop
        full = iio.improps(lego / names["train"][0]).shape[1]
        focal = 0.5 * full / math.tan(0.5 * angle)
        meta.update(fl_x=focal, fl_y=focal, w=w, h=h, cx=w / 2 if centre_crop_camera else full / 2 - c0,
                    cy=h / 2 if centre_crop_camera else full / 2 - r0)
        del meta["camera_angle_x"]
    if bounds:
        meta.update(near=2.0, far=6.0)
    (out / "transforms.json").write_text(json.dumps(meta))
    return out


def llff_as_transforms(scene: Path, out: Path, factor: int = 8) -> Path:
    """An LLFF scene's images_<factor> and poses_bounds.npy poses as a transforms.json in `out` (images linked),
    without near/far: LLFF's pose columns (down, right, back) become OpenGL's (right, up, back); the focal
    length is divided by factor and the principal point left out (the image centre, as the LLFF loader's K)."""
    out.mkdir(parents=True, exist_ok=True)
    folder = f"images_{factor}"
    if not (out / folder).exists():
        os.symlink(scene / folder, out / folder)
    names = sorted(f.name for f in (scene / folder).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rows = np.load(scene / "poses_bounds.npy")
    poses = rows[:, :15].reshape(-1, 3, 5)
    h, w = iio.improps(scene / folder / names[0]).shape[:2]
    frames = []
    for name, pose in zip(names, poses):
        c2w = np.eye(4)
        c2w[:3, :4] = np.stack([pose[:, 1], -pose[:, 0], pose[:, 2], pose[:, 3]], 1)
        frames.append({"file_path": f"{folder}/{name}", "transform_matrix": c2w.tolist()})
    meta = {"fl_x": float(poses[0, 2, 4]) / factor, "w": int(w), "h": int(h), "frames": frames}
    (out / "transforms.json").write_text(json.dumps(meta))
    return out


def fern_runs(fern: Path, out: Path, steps: int) -> dict:
    """The --fern runs: name -> (datadir, flags)."""
    common = ["--config", str(REPO / "configs" / "fern.txt"), "--netdepth", "4", "--netwidth", "64",
              "--netdepth_fine", "4", "--netwidth_fine", "64", "--N_rand", "512", "--llffhold", "8"]
    return {"llff_no_ndc": (fern, common + ["--dataset_type", "llff", "--factor", "8", "--no_ndc"]),
            "fern_transforms": (llff_as_transforms(fern, out / "data" / "fern"),
                                common + ["--dataset_type", "nerfstudio", "--factor", "1"])}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10.0 * np.log10(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def run_all(runs: dict, common: list, out: Path) -> None:
    """Trains every run (name -> (datadir, flags)) in parallel, one process each, logging to out/<name>.log."""
    procs = {}
    for name, (datadir, extra) in runs.items():
        log = open(out / f"{name}.log", "w")
        procs[name] = subprocess.Popen([sys.executable, str(REPO / "run_nerf.py"), *common, *extra, "--expname", name,
                                        "--datadir", str(datadir)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    for name, proc in procs.items():
        if proc.wait() != 0:
            print(f"{name}: exit {proc.returncode}, see {out / (name + '.log')}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scenes = parser.add_mutually_exclusive_group(required=True)
    scenes.add_argument("--lego", type=Path)
    scenes.add_argument("--fern", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=None, help="run only these runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    schedule = ["--basedir", str(args.out / "logs"), "--N_iters", str(args.steps), "--i_testset", str(args.steps),
                "--i_weights", str(args.steps), "--i_video", "100000000", "--i_img", "100000000", "--i_print", "100",
                "--seed", "0", "--no_download"]
    if args.fern:
        runs = fern_runs(args.fern, args.out, args.steps)
        runs = {name: runs[name] for name in args.only or runs}
        run_all(runs, schedule, args.out)
        for name, (datadir, _) in runs.items():
            metrics = args.out / "logs" / name / f"testset_{args.steps:06d}" / "metrics.json"
            if metrics.is_file():
                print(json.dumps({"run": name, "datadir": str(datadir), "steps": args.steps,
                                  "psnr": json.loads(metrics.read_text())["mean"]["psnr"]}))
        return 0
    scenes = {"blender": (args.lego, ["--dataset_type", "blender", "--half_res", "--testskip", "40"]),
              "transforms": (blender_as_transforms(args.lego, data / "lego"),
                             ["--dataset_type", "nerfstudio", "--factor", "2", "--testskip", "1"]),
              "crop": (blender_as_transforms(args.lego, data / "crop", crop=CROP),
                       ["--dataset_type", "nerfstudio", "--factor", "2", "--testskip", "1"]),
              "crop_centred": (blender_as_transforms(args.lego, data / "crop_centred", crop=CROP,
                                                     centre_crop_camera=True),
                               ["--dataset_type", "nerfstudio", "--factor", "2", "--testskip", "1"])}
    common = ["--config", str(REPO / "configs" / "lego.txt"), "--netdepth", "4", "--netwidth", "64",
              "--netdepth_fine", "4", "--netwidth_fine", "64", "--N_rand", "512", "--N_samples", "32",
              "--N_importance", "32", "--precrop_iters", "200"]
    names = args.only or list(scenes)
    run_all({name: scenes[name] for name in names}, schedule + common, args.out)
    r0, c0, h, w = (c // 2 for c in CROP)
    for name in names:
        folder = args.out / "logs" / name / f"testset_{args.steps:06d}"
        if not (folder / "metrics.json").is_file():
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        datadir = scenes[name][0]
        gt_names = json.loads((data / "crop" / "transforms.json").read_text())["test_filenames"]
        window = []
        for k, gt_name in enumerate(gt_names):
            render = iio.imread(folder / f"{k:03d}.png")[..., :3] / 255.0
            if name in ("blender", "transforms"):
                render = render[r0:r0 + h, c0:c0 + w]
            gt = iio.imread(data / "crop" / gt_name) / 255.0
            gt = gt.reshape(h, 2, w, 2, 4).mean((1, 3))
            window.append(psnr(render, gt[..., :3] * gt[..., 3:] + (1 - gt[..., 3:])))
        print(json.dumps({"run": name, "datadir": str(datadir), "steps": args.steps,
                          "psnr": metrics["mean"]["psnr"], "psnr_crop_window": float(np.mean(window))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
