"""One entry point from the command-line flags to a loaded scene.

Dataset types: llff, blender, LINEMOD, deepvoxels (as in the original),
demo, a small Blender-format scene this project renders itself on first use,
and nerfstudio, the transforms.json of capture tools (nerf/load_transforms.py:
its own K, trained without NDC).
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from nerf.errors import DataError
from nerf.load_transforms import load_transforms_data, normalised
from load_blender import load_blender_data
from load_deepvoxels import load_dv_data
from load_LINEMOD import load_LINEMOD_data
from load_llff import eight_bit_colours, load_llff_data

DATASET_TYPES = ("llff", "blender", "LINEMOD", "deepvoxels", "demo", "nerfstudio")


class EightBitImages:
    """Images (N, H, W, 3) kept as the uint8 values of their 8-bit files, a
    quarter of float32's memory. Indexing gives the float32 colours the loader
    would have returned, `eight_bit_colours(values[index])`; np.asarray gives
    them all."""
    dtype = np.dtype(np.float32)

    def __init__(self, values: np.ndarray):
        self.values = values
        self.table = eight_bit_colours(np.arange(256))     # colour of each 8-bit value
        self.shape, self.ndim = values.shape, values.ndim

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index) -> np.ndarray:
        return self.table[self.values[index]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.table[self.values].astype(dtype or np.float32, copy=False)


@dataclass
class Scene:
    """images (N, H, W, 3) in [0, 1], float32 or EightBitImages; poses (N, 3, 4)
    camera-to-world; render_poses (P, 3 or 4, 4); K (3, 3); index arrays per
    split; ray bounds."""
    images: Union[np.ndarray, EightBitImages]
    poses: np.ndarray
    render_poses: np.ndarray
    H: int
    W: int
    focal: float
    K: np.ndarray
    i_train: np.ndarray
    i_val: np.ndarray
    i_test: np.ndarray
    near: float
    far: float

    @property
    def hwf(self):
        return [self.H, self.W, self.focal]

    @property
    def hwK(self):
        """(H, W, K): what nerf.geometry's `hwf` arguments take for a general camera."""
        return (self.H, self.W, self.K)


def composite(images: np.ndarray, white_bkgd: bool) -> np.ndarray:
    """RGBA (N, H, W, 4) -> RGB: rgb * a + (1 - a) on white, else alpha dropped."""
    if images.shape[-1] < 4:
        return images
    if white_bkgd:
        return images[..., :3] * images[..., -1:] + (1.0 - images[..., -1:])
    return images[..., :3]


def load_scene(args) -> Scene:
    """Loads the scene that `args` names (dataset_type, datadir and their options)."""
    if not Path(args.datadir).is_dir() and args.dataset_type != "demo":
        raise DataError(args.datadir, "data folder does not exist")
    K: Optional[np.ndarray] = None
    if args.dataset_type == "llff":
        images, poses, bds, render_poses, i_test = load_llff_data(
            args.datadir, args.factor, recenter=True, bd_factor=.75, spherify=args.spherify, eight_bit=True)
        if images.dtype == np.uint8:
            images = EightBitImages(images)
        hwf = poses[0, :3, -1]
        poses = poses[:, :3, :4]
        i_test = np.arange(images.shape[0])[::args.llffhold] if args.llffhold > 0 else np.array([i_test])
        i_val = i_test
        i_train = np.array([i for i in range(images.shape[0]) if i not in i_test and i not in i_val])
        near, far = (float(bds.min()) * .9, float(bds.max()) * 1.0) if args.no_ndc else (0.0, 1.0)
    elif args.dataset_type in ("blender", "demo"):
        if args.dataset_type == "demo":
            from nerf.demo_scene import ensure_demo_scene
            ensure_demo_scene(args.datadir)
        images, poses, render_poses, hwf, (i_train, i_val, i_test) = load_blender_data(
            args.datadir, args.half_res, args.testskip)
        near, far = 2.0, 6.0
        images = composite(images, args.white_bkgd)
    elif args.dataset_type == "LINEMOD":
        images, poses, render_poses, hwf, K, (i_train, i_val, i_test), near, far = load_LINEMOD_data(
            args.datadir, args.half_res, args.testskip)
        images = composite(images, args.white_bkgd)
    elif args.dataset_type == "deepvoxels":
        images, poses, render_poses, hwf, (i_train, i_val, i_test) = load_dv_data(
            scene=args.shape, basedir=args.datadir, testskip=args.testskip)
        hemi_R = np.mean(np.linalg.norm(poses[:, :3, -1], axis=-1))
        near, far = float(hemi_R - 1.0), float(hemi_R + 1.0)
        images = composite(images, args.white_bkgd)
    elif args.dataset_type == "nerfstudio":
        images, poses, render_poses, K, (i_train, i_val, i_test), bounds = load_transforms_data(
            args.datadir, args.factor, args.testskip, args.llffhold)
        poses, near, far, scale, shift = normalised(poses, bounds)
        render_poses = poses                        # the capture's own path (see load_transforms_data)
        logging.getLogger("nerf").info(
            "transforms.json: near %.4g, far %.4g from %s; camera positions moved by (%s) and scaled by %.4g "
            "(near %.4g, far %g)", bounds.near, bounds.far, bounds.source, ", ".join(f"{v:.4g}" for v in shift),
            scale, near, far)
        hwf = [images.shape[1], images.shape[2], K[0][0]]
        if images.dtype == np.uint8 and images.shape[-1] == 3:
            images = EightBitImages(images)
        else:
            images = composite(eight_bit_colours(images) if images.dtype == np.uint8 else images, args.white_bkgd)
    else:
        raise DataError("--dataset_type", f"unknown '{args.dataset_type}' (one of {', '.join(DATASET_TYPES)})")

    H, W, focal = int(hwf[0]), int(hwf[1]), float(hwf[2])
    if K is None:
        K = np.array([[focal, 0, 0.5 * W], [0, focal, 0.5 * H], [0, 0, 1]])
    if not isinstance(images, EightBitImages):
        images = np.asarray(images, dtype=np.float32)
    return Scene(images=images, poses=poses[:, :3, :4].astype(np.float32),
                 render_poses=np.asarray(render_poses, dtype=np.float32), H=H, W=W, focal=focal,
                 K=np.asarray(K, dtype=np.float64), i_train=np.asarray(i_train), i_val=np.asarray(i_val),
                 i_test=np.asarray(i_test), near=float(near), far=float(far))
