"""Where each training step's rays come from.

`RayBatcher` (the default): the rays of all training images, shuffled once,
consumed N_rand at a time and reshuffled after each epoch. `ImageRaySampler`
(--no_batching): one random training image per step and N_rand of its pixels
drawn without replacement, from the centre crop while step < precrop_iters.

Both return (batch_rays (2, N_rand, 3) = [rays_o, rays_d], target_s (N_rand, 3))
and expose state_dict / load_state_dict so a resumed run draws exactly the
batches an uninterrupted one would.
"""
from typing import Tuple

import numpy as np
import torch

from run_nerf_helpers import get_rays, get_rays_np


class RayBatcher:
    """Every ray of the training images as rows [rays_o, rays_d, rgb] (M, 3, 3).

    Draws follow the original: a NumPy shuffle first, then torch.randperm
    after each epoch; the rows stay in place and a permutation indexes them.
    """

    def __init__(self, images: np.ndarray, poses: np.ndarray, i_train, H: int, W: int, K, N_rand: int,
                 device: torch.device):
        rays = np.stack([np.stack(get_rays_np(H, W, K, poses[i, :3, :4]), 0) for i in i_train], 0)  # (n, 2, H, W, 3)
        rays_rgb = np.concatenate([rays, images[i_train][:, None, ..., :3]], 1)                   # (n, 3, H, W, 3)
        rays_rgb = np.transpose(rays_rgb, [0, 2, 3, 1, 4]).reshape([-1, 3, 3]).astype(np.float32)
        self.rays_rgb = torch.from_numpy(rays_rgb).to(device)
        self.N_rand = N_rand
        self.perm = torch.from_numpy(np.random.permutation(self.rays_rgb.shape[0])).to(device)
        self.i_batch = 0

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = self.rays_rgb[self.perm[self.i_batch:self.i_batch + self.N_rand]]   # (N, 3, 3)
        batch = torch.transpose(batch, 0, 1)
        self.i_batch += self.N_rand
        if self.i_batch >= self.rays_rgb.shape[0]:
            self.perm = self.perm[torch.randperm(self.perm.shape[0], device=self.perm.device)]
            self.i_batch = 0
        return batch[:2], batch[2]

    def state_dict(self) -> dict:
        small = self.perm.shape[0] < 2 ** 31
        return {"perm": self.perm.to(torch.int32 if small else torch.int64).cpu(), "i_batch": self.i_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["perm"].shape[0] != self.perm.shape[0]:
            raise ValueError(f"batcher state holds {state['perm'].shape[0]} rays, the scene has {self.perm.shape[0]}")
        self.perm = state["perm"].to(torch.int64).to(self.perm.device)
        self.i_batch = int(state["i_batch"])


class ImageRaySampler:
    """N_rand pixels of one random training image per step."""

    def __init__(self, images: np.ndarray, poses: np.ndarray, i_train, H: int, W: int, K, N_rand: int,
                 precrop_iters: int, precrop_frac: float, device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(images[..., :3])).to(device)
        self.poses = torch.from_numpy(np.ascontiguousarray(poses[:, :3, :4])).float().to(device)
        self.i_train = np.asarray(i_train)
        self.H, self.W, self.K, self.N_rand = H, W, K, N_rand
        self.precrop_iters, self.precrop_frac = precrop_iters, precrop_frac

    def pixel_coords(self, step: int) -> torch.Tensor:
        """(P, 2) candidate (row, column) pairs: the centre crop early on, else all."""
        H, W = self.H, self.W
        if step < self.precrop_iters:
            dH, dW = int(H // 2 * self.precrop_frac), int(W // 2 * self.precrop_frac)
            rows = torch.arange(H // 2 - dH, H // 2 + dH)
            cols = torch.arange(W // 2 - dW, W // 2 + dW)
        else:
            rows, cols = torch.arange(H), torch.arange(W)
        return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_i = np.random.choice(self.i_train)
        rays_o, rays_d = get_rays(self.H, self.W, self.K, self.poses[img_i])
        coords = self.pixel_coords(step)
        select = coords[np.random.choice(coords.shape[0], size=[self.N_rand], replace=False)]
        rows, cols = select[:, 0].to(rays_o.device), select[:, 1].to(rays_o.device)
        batch_rays = torch.stack([rays_o[rows, cols], rays_d[rows, cols]], 0)
        return batch_rays, self.images[img_i][rows, cols]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
