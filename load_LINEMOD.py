"""LINEMOD objects in the Blender layout, with per-frame intrinsics and bounds.

Frames give `file_path` (with its extension, absolute or relative to the
scene folder, or else to the working directory, where the original looked),
`transform_matrix` and `intrinsic_matrix`; the train and test JSONs give
`near` and `far`.
"""
import numpy as np

from nerf.errors import DataError
from load_blender import load_splits, spherical_render_poses


def load_LINEMOD_data(basedir, half_res: bool = False, testskip: int = 1):
    """Returns imgs (N, H, W, C), poses (N, 4, 4), render_poses (40, 4, 4),
    [H, W, focal], K (3, 3), i_split, near, far. Near and far are the floor of
    the smallest and the ceiling of the largest bound of train and test.
    half_res halves H, W, focal and K (the original left K at full size)."""
    imgs, poses, i_split, metas = load_splits(basedir, testskip, half_res, suffix="")
    H, W = imgs.shape[1:3]
    try:
        K = np.array(metas["test"]["frames"][0]["intrinsic_matrix"], dtype=np.float64)[:3, :3]
        near = np.floor(min(metas["train"]["near"], metas["test"]["near"]))
        far = np.ceil(max(metas["train"]["far"], metas["test"]["far"]))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(basedir, f"transforms files lack intrinsics or bounds ({exc})") from None
    if half_res:
        K[:2] /= 2.0
    focal = float(K[0, 0])
    return imgs, poses, spherical_render_poses(), [H, W, focal], K, i_split, near, far
