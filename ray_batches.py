"""Where each training step's rays come from.

`RayBatcher` (the default): the rays of all training images, shuffled once,
consumed N_rand at a time and reshuffled after each epoch. `ImageRaySampler`
(--no_batching): one random training image per step and N_rand of its pixels
drawn without replacement, from the centre crop while step < precrop_iters.

Both return (batch_rays (2, N_rand, 3) = [rays_o, rays_d], target_s (N_rand, 3))
and expose state_dict / load_state_dict so a resumed run draws exactly the
batches an uninterrupted one would.

Per-step cost does not grow with the image size: the batcher's rays are built
once, and the sampler computes rays for the drawn pixels only. Data stays on
the training device when it fits `device_budget_bytes` (default: a quarter of
the GPU's memory); otherwise it stays in pinned host memory, each step gathers
its rows there and copies them over asynchronously, the next batch being
gathered and sent while the current step runs.
"""
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from run_nerf_helpers import get_rays


def default_device_budget(device: torch.device) -> float:
    """Bytes of training data to keep on `device`: unlimited on the CPU (it is
    host memory anyway), a quarter of the GPU's memory otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 4
    return float("inf")


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in page-locked memory when copies to `device` can be asynchronous."""
    return t.pin_memory() if device.type == "cuda" else t


def rays_at(K, c2w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`get_rays(H, W, K, c2w)[rows, cols]` for the given pixels only, by the same
    per-pixel formula: rays_o, rays_d, each (N, 3)."""
    K = torch.as_tensor(K, dtype=c2w.dtype, device=c2w.device)
    i = cols.to(c2w.dtype)
    j = rows.to(c2w.dtype)
    dirs = torch.stack([(i - K[0][2]) / K[0][0], -(j - K[1][2]) / K[1][1], -torch.ones_like(i)], -1)
    rays_d = torch.sum(dirs[..., None, :] * c2w[:3, :3], -1)
    rays_o = c2w[:3, -1].expand(rays_d.shape)
    return rays_o, rays_d


def draw_distinct(n_pop: int, n: int) -> np.ndarray:
    """n distinct integers from range(n_pop), uniformly (every n-subset and
    order equally likely), with NumPy's global generator, in O(n) instead of
    `np.random.choice(n_pop, n, replace=False)`'s permutation of all n_pop:
    the first n distinct values of a uniform i.i.d. sequence."""
    if n > n_pop:
        raise ValueError(f"cannot draw {n} distinct pixels from {n_pop}")
    if 4 * n > n_pop:
        return np.random.permutation(n_pop)[:n]
    seq = np.empty(0, dtype=np.int64)
    while True:
        more = np.random.randint(0, n_pop, size=n - len(np.unique(seq)) + n // 16 + 8, dtype=np.int64)
        seq = np.concatenate([seq, more])
        _, first = np.unique(seq, return_index=True)
        if len(first) >= n:
            return seq[np.sort(first)[:n]]


class _AsyncRows:
    """Rows of a host tensor gathered into pinned staging memory and copied to
    the device without blocking; two staging buffers so the next batch can be
    in flight while the current one is in use."""

    def __init__(self, device: torch.device):
        self.device = device
        self.staging = [None, None]
        self.events = [None, None]
        self.k = 0

    def __call__(self, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":                   # host to host: nothing to overlap
            return torch.index_select(source, 0, index).to(self.device)
        k = self.k = 1 - self.k
        if self.events[k] is not None:
            self.events[k].synchronize()            # its previous copy has finished
        shape = (index.shape[0],) + tuple(source.shape[1:])
        if self.staging[k] is None or self.staging[k].shape != shape:
            self.staging[k] = torch.empty(shape, dtype=source.dtype).pin_memory()
        torch.index_select(source, 0, index, out=self.staging[k])
        out = self.staging[k].to(self.device, non_blocking=True)
        self.events[k] = torch.cuda.Event()
        self.events[k].record()
        return out


class RayBatcher:
    """Every ray of the training images as rows [rays_o, rays_d, rgb] (M, 3, 3).

    Draws follow the original: a NumPy shuffle first, then torch.randperm
    after each epoch; the rows stay in place and a permutation indexes them.
    The rows live on the device within `device_budget_bytes`, else in pinned
    host memory (then the permutation is a host tensor and batches are
    prefetched one step ahead).
    """

    def __init__(self, images: np.ndarray, poses: np.ndarray, i_train, H: int, W: int, K, N_rand: int,
                 device: torch.device, device_budget_bytes: Optional[float] = None, rank: int = 0,
                 world_size: int = 1, share_permutation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        device = torch.device(device)
        self.rank, self.world_size, self.share_permutation = rank, world_size, share_permutation
        n_rows = len(i_train) * H * W
        budget = default_device_budget(device) if device_budget_bytes is None else device_budget_bytes
        on_device = n_rows * 9 * 4 <= budget
        home = device if on_device else torch.device("cpu")
        rays_rgb = torch.empty(len(i_train), H, W, 3, 3, dtype=torch.float32, device=home)
        for k, i in enumerate(i_train):
            c2w = torch.as_tensor(np.asarray(poses[i, :3, :4], dtype=np.float32), device=device)
            rays_o, rays_d = get_rays(H, W, K, c2w)
            rays_rgb[k, :, :, 0] = rays_o
            rays_rgb[k, :, :, 1] = rays_d
            rays_rgb[k, :, :, 2] = torch.as_tensor(np.asarray(images[i][..., :3], dtype=np.float32))
        self.rays_rgb = rays_rgb.reshape(-1, 3, 3)
        self.device = device
        self.fetch = None
        if not on_device:
            self.rays_rgb = _pinned(self.rays_rgb, device)
            self.fetch = _AsyncRows(device)
        self.N_rand = N_rand
        self.perm = torch.from_numpy(np.random.permutation(self.rays_rgb.shape[0])).to(home)
        self.i_batch = 0
        self.ahead = None                                   # (i_batch, batch) prefetched

    def _gather(self, i_batch: int) -> torch.Tensor:
        index = self.perm[i_batch:i_batch + self.N_rand]
        if self.fetch is None:
            return self.rays_rgb[index]
        return self.fetch(self.rays_rgb, index)

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.ahead is not None and self.ahead[0] == self.i_batch:
            batch = self.ahead[1]
        else:
            batch = self._gather(self.i_batch)              # (N, 3, 3)
        self.ahead = None
        batch = torch.transpose(batch, 0, 1)
        self.i_batch += self.N_rand
        if self.i_batch >= self.rays_rgb.shape[0]:
            shuffle = torch.randperm(self.perm.shape[0], device=self.perm.device)
            if self.share_permutation is not None:
                shuffle = self.share_permutation(shuffle)
            self.perm = self.perm[shuffle]
            self.i_batch = 0
        if self.fetch is not None:
            self.ahead = (self.i_batch, self._gather(self.i_batch))
        n = batch.shape[1] // self.world_size
        return batch[:2, self.rank * n:(self.rank + 1) * n], batch[2, self.rank * n:(self.rank + 1) * n]

    def state_dict(self) -> dict:
        small = self.perm.shape[0] < 2 ** 31
        return {"perm": self.perm.to(torch.int32 if small else torch.int64).cpu(), "i_batch": self.i_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["perm"].shape[0] != self.perm.shape[0]:
            raise ValueError(f"batcher state holds {state['perm'].shape[0]} rays, the scene has {self.perm.shape[0]}")
        self.perm = state["perm"].to(torch.int64).to(self.perm.device)
        self.i_batch = int(state["i_batch"])
        self.ahead = None


class ImageRaySampler:
    """N_rand pixels of one random training image per step.

    The image is drawn with `np.random.choice(i_train)` as in the original; the
    pixels with `draw_distinct` (NumPy's global generator, O(N_rand)) where the
    original permuted every pixel of the image with `np.random.choice(...,
    replace=False)`: same distribution, other pixels for the same seed. Rays
    are computed for the drawn pixels only, with `get_rays`' formula.
    """

    def __init__(self, images: np.ndarray, poses: np.ndarray, i_train, H: int, W: int, K, N_rand: int,
                 precrop_iters: int, precrop_frac: float, device: torch.device,
                 device_budget_bytes: Optional[float] = None, rank: int = 0, world_size: int = 1):
        device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        budget = default_device_budget(device) if device_budget_bytes is None else device_budget_bytes
        images = torch.from_numpy(np.ascontiguousarray(images[..., :3], dtype=np.float32))
        on_device = images.numel() * 4 <= budget
        self.images = images.to(device) if on_device else _pinned(images, device)
        self.fetch = None if on_device else _AsyncRows(device)
        self.poses = torch.from_numpy(np.ascontiguousarray(poses[:, :3, :4])).float().to(device)
        self.i_train = np.asarray(i_train)
        self.H, self.W, self.K, self.N_rand = H, W, K, N_rand
        self.K_t = torch.as_tensor(K, dtype=torch.float32, device=device)
        self.device = device
        self.precrop_iters, self.precrop_frac = precrop_iters, precrop_frac

    def window(self, step: int) -> Tuple[int, int, int, int]:
        """(first row, first column, rows, columns) of the pixels to draw from."""
        H, W = self.H, self.W
        if step < self.precrop_iters:
            dH, dW = int(H // 2 * self.precrop_frac), int(W // 2 * self.precrop_frac)
            return H // 2 - dH, W // 2 - dW, 2 * dH, 2 * dW
        return 0, 0, H, W

    def pixel_coords(self, step: int) -> torch.Tensor:
        """(P, 2) candidate (row, column) pairs: the centre crop early on, else all."""
        r0, c0, h, w = self.window(step)
        rows, cols = torch.arange(r0, r0 + h), torch.arange(c0, c0 + w)
        return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_i = int(np.random.choice(self.i_train))
        r0, c0, h, w = self.window(step)
        flat = torch.from_numpy(draw_distinct(h * w, self.N_rand))
        rows, cols = flat // w + r0, flat % w + c0
        if self.fetch is None:
            rows, cols = rows.to(self.device), cols.to(self.device)
            target_s = self.images[img_i][rows, cols]
        else:
            target_s = self.fetch(self.images[img_i].view(-1, 3), rows * self.W + cols)
            rows, cols = rows.to(self.device, non_blocking=True), cols.to(self.device, non_blocking=True)
        rays_o, rays_d = rays_at(self.K_t, self.poses[img_i], rows, cols)
        n = self.N_rand // self.world_size
        share = slice(self.rank * n, (self.rank + 1) * n)
        return torch.stack([rays_o, rays_d], 0)[:, share], target_s[share]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
