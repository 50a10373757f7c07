"""DeepVoxels scenes: `{train,validation,test}/<scene>/{rgb,pose}` and `intrinsics.txt`.

Poses are 4x4 camera-to-world matrices in OpenCV axes (y down, z forward),
turned into NeRF's OpenGL axes by negating the y and z columns. The
intrinsics are rescaled to the images' side (DeepVoxels' renders are 512 x 512;
the original assumed that size whatever the images were).
"""
import os
from pathlib import Path
from typing import Tuple

import imageio.v3 as iio
import numpy as np

from nerf.errors import DataError

def parse_intrinsics(filepath: Path, trgt_sidelength: int) -> Tuple[np.ndarray, np.ndarray, float, float, bool]:
    """Reads `f cx cy`, the grid barycentre, near plane, scale, `height width`
    and an optional world2cam flag. Returns (4x4 intrinsics rescaled to the
    target side length, barycentre, scale, near_plane, world2cam_poses)."""
    try:
        lines = Path(filepath).read_text().splitlines()
        f, cx, cy = list(map(float, lines[0].split()))[:3]
        grid_barycenter = np.array(list(map(float, lines[1].split())))
        near_plane = float(lines[2])
        scale = float(lines[3])
        height, width = map(float, lines[4].split())
    except (OSError, IndexError, ValueError) as exc:
        raise DataError(filepath, f"unreadable intrinsics ({exc})") from None
    try:
        world2cam_poses = bool(int(lines[5]))
    except (IndexError, ValueError):
        world2cam_poses = False
    cx = cx / width * trgt_sidelength
    cy = cy / height * trgt_sidelength
    f = trgt_sidelength / height * f
    full_intrinsic = np.array([[f, 0., cx, 0.], [0., f, cy, 0], [0., 0, 1, 0], [0, 0, 0, 1]])
    return full_intrinsic, grid_barycenter, scale, near_plane, world2cam_poses


def load_pose(filename: Path) -> np.ndarray:
    """A 4x4 pose written as 16 numbers."""
    try:
        return np.array([float(x) for x in Path(filename).read_text().split()]).reshape([4, 4]).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise DataError(filename, f"not a 4x4 pose ({exc})") from None


def _sorted_files(folder: Path, ext: str):
    if not folder.is_dir():
        raise DataError(folder, "missing")
    return [folder / f for f in sorted(os.listdir(folder)) if f.endswith(ext)]


def dir2poses(posedir: Path) -> np.ndarray:
    """All poses of a folder, (n, 3, 4), in NeRF's axes."""
    poses = np.stack([load_pose(f) for f in _sorted_files(posedir, "txt")], 0)
    transf = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1.]])
    return (poses @ transf)[:, :3, :4].astype(np.float32)


def _read_rgb(folder: Path, skip: int) -> np.ndarray:
    return np.stack([iio.imread(f) / 255. for f in _sorted_files(folder, "png")[::skip]], 0).astype(np.float32)


def load_dv_data(scene: str = 'cube', basedir: str = '/data/deepvoxels', testskip: int = 8):
    """Returns imgs (N, H, W, C), poses (N, 3, 4), render_poses (the test
    poses), [H, W, focal] and i_split [train, val, test]."""
    base = Path(basedir)
    testskip = testskip or 1    # 0 keeps every frame, as for the Blender loader
    train_dir = base / "train" / scene
    all_imgs = [_read_rgb(train_dir / "rgb", 1),
                _read_rgb(base / "validation" / scene / "rgb", testskip),
                _read_rgb(base / "test" / scene / "rgb", testskip)]
    H, W = all_imgs[0].shape[1:3]
    full_intrinsic, _, _, _, _ = parse_intrinsics(train_dir / "intrinsics.txt", H)
    focal = full_intrinsic[0, 0]

    poses = dir2poses(train_dir / "pose")
    valposes = dir2poses(base / "validation" / scene / "pose")[::testskip]
    testposes = dir2poses(base / "test" / scene / "pose")[::testskip]
    counts = np.cumsum([0] + [x.shape[0] for x in all_imgs])
    i_split = [np.arange(counts[i], counts[i + 1]) for i in range(3)]
    imgs = np.concatenate(all_imgs, 0)
    poses = np.concatenate([poses, valposes, testposes], 0)
    return imgs, poses, testposes, [H, W, focal], i_split
