"""Where each training step's rays come from.

`RayBatcher` (the default): the pixels of all training images, shuffled once,
consumed N_rand at a time and reshuffled after each epoch. `ImageRaySampler`
(--no_batching): one random training image per step and N_rand of its pixels
drawn without replacement, from the centre crop while step < precrop_iters.

Both return (batch_rays (2, N_rand, 3) = [rays_o, rays_d], target_s (N_rand, 3))
and expose state_dict / load_state_dict so a resumed run draws exactly the
batches an uninterrupted one would.

Only the training pixels' colours are kept (`TrainingPixels`): as uint8 8-bit
values where the images are exactly the colours of 8-bit files (3 bytes a
pixel), else float32. Each batch's rays are computed from its pixels'
(image, row, column) with `get_rays`' per-pixel formula (`rays_at`), so the
batches are bit for bit those of a buffer of precomputed rays, at a twelfth
of its memory; a fork's edit of get_rays / get_rays_np is checked for at the
start and then followed (`TrainingPixels`). Data stays on the training device when it fits
`device_budget_bytes` (default: half the GPU's memory); otherwise it
stays in pinned host memory, each step gathers its rows there and copies them
over asynchronously, the next batch being gathered and sent while the current
step runs.

For data-parallel training each of `world_size` processes takes its share of
every batch: rank r gets rows [r n, (r + 1) n) of the batch a single process
would draw, n = N_rand / world_size. All ranks advance the same random state
(the same draws), so they stay in step and their state_dicts are equal.
"""
import logging
from typing import Callable, Optional, Tuple

import numpy as np
import torch

import run_nerf_helpers as helpers      # looked up at call time: a fork's edit or assignment is followed
from nerf.datasets import EightBitImages
from load_llff import eight_bit_colours

log = logging.getLogger("nerf")

# Allowed difference between `rays_at` and the helpers' ray functions, relative to the largest origin or
# direction. Measured on fern: 0 against get_rays (the same float32 operations), 1.2e-7 (one float32 ulp)
# against get_rays_np (float64 intrinsics); a half-pixel shift of the pixel centres moves directions by
# 1 / (2 focal), over 1.5e-4 for focal lengths under 3300 pixels (fern at full resolution).
RAYS_RTOL = 1e-5


def default_device_budget(device: torch.device) -> float:
    """Bytes of training data to keep on `device`: unlimited on the CPU (it is
    host memory anyway), half the GPU's memory otherwise (at 3 bytes a pixel,
    the largest LLFF scene at factor 1, horns' 54 training views of 12 MP,
    needs 2.0 GB: it fits an 8 GB GPU with room for the networks)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2
    return float("inf")


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in page-locked memory when copies to `device` can be asynchronous."""
    return t.pin_memory() if device.type == "cuda" else t


def rays_at(K, c2w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`get_rays(H, W, K, c2w)[rows, cols]` for the given pixels only, by the same
    per-pixel formula. c2w: (3, 4), or (N, 3, 4) one camera per pixel; rows,
    cols: (N,). Returns rays_o, rays_d, each (N, 3)."""
    K = torch.as_tensor(K, dtype=c2w.dtype, device=c2w.device)
    i = cols.to(c2w.dtype)
    j = rows.to(c2w.dtype)
    dirs = torch.stack([(i - K[0][2]) / K[0][0], -(j - K[1][2]) / K[1][1], -torch.ones_like(i)], -1)
    rays_d = torch.sum(dirs[..., None, :] * c2w[..., :3, :3], -1)
    rays_o = c2w[..., :3, -1].expand(rays_d.shape)
    return rays_o, rays_d


def rays_formula_differs(H: int, W: int, K, poses: torch.Tensor, reference: str) -> Optional[str]:
    """None when `rays_at` gives the rays of `run_nerf_helpers.<reference>`
    ("get_rays" or "get_rays_np", as that module holds it now: a fork may
    have edited it) from the first, middle and last of `poses` (n, 3, 4),
    to RAYS_RTOL; else what differs. Runs on the host."""
    poses = poses.cpu()
    K32 = torch.as_tensor(K, dtype=torch.float32)
    rows, cols = (g.reshape(-1) for g in torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"))
    for k in sorted({0, len(poses) // 2, len(poses) - 1}):
        fast = rays_at(K32, poses[k], rows, cols)
        if reference == "get_rays_np":
            theirs = helpers.get_rays_np(H, W, np.asarray(torch.as_tensor(K).cpu()), poses[k].numpy())
        else:
            theirs = helpers.get_rays(H, W, K32, poses[k])
        for name, a, b in zip(("origins", "directions"), fast, theirs):
            b = (b.detach().cpu() if torch.is_tensor(b) else torch.from_numpy(np.array(b))).float().reshape(-1, 3)
            if b.shape != a.shape:
                return f"gives rays of shape {tuple(b.shape)} for {H} x {W} pixels"
            scale = float(torch.maximum(a.abs().max(), b.abs().max()))
            off = float((a - b).abs().max()) / scale if scale > 0 else 0.0
            if not off <= RAYS_RTOL:
                return f"gives other rays (the {name} off by {off:.2g} of their largest value)"
    return None


def eight_bit_values(image: np.ndarray) -> Optional[np.ndarray]:
    """The uint8 values v with eight_bit_colours(v) == image bit for bit, or
    None where the image is not exactly the colours of an 8-bit file (e.g.
    composited on white, or averaged to half resolution). image: (H, W, 3)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        values = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    exact = np.array_equal(eight_bit_colours(np.arange(256))[values].view(np.uint32), image.view(np.uint32))
    return values if exact else None


def training_colours(images, i_train) -> torch.Tensor:
    """The training images' colours (n, H, W, 3), on the host: uint8 values
    (3 bytes a pixel) when every training image is exactly the colours of
    8-bit values (`eight_bit_values`), else float32 (12 bytes).
    images: (N, H, W, C >= 3) float array or EightBitImages."""
    if isinstance(images, EightBitImages):
        return torch.from_numpy(np.ascontiguousarray(images.values[np.asarray(i_train)]))
    first = images[i_train[0]]
    colours = torch.empty((len(i_train),) + first.shape[:2] + (3,), dtype=torch.uint8)
    for k, i in enumerate(i_train):
        values = eight_bit_values(images[i][..., :3])
        if values is None:
            return torch.from_numpy(np.ascontiguousarray(np.asarray(images)[np.asarray(i_train), ..., :3],
                                                         dtype=np.float32))
        colours[k] = torch.from_numpy(values)
    return colours


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
        self.events[k].record(torch.cuda.current_stream(self.device))
        return out


def share_size(N_rand: int, rank: int, world_size: int) -> int:
    """Rays per process of a global batch of N_rand split over world_size processes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} processes")
    if N_rand % world_size:
        raise ValueError(f"--N_rand {N_rand} does not split into {world_size} equal shares, one per process")
    return N_rand // world_size


class TrainingPixels:
    """The training images' colours, flattened to (n H W, 3) in (image, row,
    column) order, with their cameras: the rays and colours of any of them.

    Colours are uint8 8-bit values where exact (see `training_colours`), made
    colours on the device by a 256-entry table. They live on the device when
    colours fit `device_budget_bytes`, else in pinned host memory (`fetch`
    set), gathered there and copied over.

    Rays are those of `run_nerf_helpers.<rays_from>` ("get_rays_np" for ray
    batching, "get_rays" for one image a step, as in the original), computed
    per pixel by `rays_at` when that gives the same rays
    (`rays_formula_differs`). A fork's edit of the helper (half-pixel centres,
    another camera convention) is followed instead, with one warning: from a
    buffer of every training pixel's rays made by get_rays_np (24 more bytes a
    pixel), or by calling get_rays on the step's image.
    """

    def __init__(self, images, poses: np.ndarray, i_train, H: int, W: int, K, device: torch.device,
                 device_budget_bytes: Optional[float] = None, rays_from: str = "get_rays_np"):
        device = torch.device(device)
        colours = training_colours(images, i_train)
        self.n_pixels = colours.shape[0] * H * W
        self.colour_bytes = colours.numel() * colours.element_size()
        budget = default_device_budget(device) if device_budget_bytes is None else device_budget_bytes
        self.on_device = self.colour_bytes <= budget
        colours = colours.reshape(-1, 3)
        self.colours = colours.to(device) if self.on_device else _pinned(colours, device)
        self.fetch = None if self.on_device else _AsyncRows(device)
        self.table = None
        if colours.dtype == torch.uint8:
            self.table = torch.from_numpy(eight_bit_colours(np.arange(256))).to(device)
        train_poses = np.ascontiguousarray(np.asarray(poses)[np.asarray(i_train), :3, :4], dtype=np.float32)
        self.poses = torch.from_numpy(train_poses).to(device)
        self.K = torch.as_tensor(K, dtype=torch.float32, device=device)
        self.H, self.W, self.device = H, W, device
        self.rays_from, self.rays = None, None         # None: rays_at; else the helper to call
        differs = rays_formula_differs(H, W, K, torch.from_numpy(train_poses), rays_from)
        if differs:
            log.warning("warning: training rays: run_nerf_helpers.%s %s than the per-pixel formula of "
                        "nerf/ray_batches.py; the training rays come from %s itself", rays_from, differs, rays_from)
            self.rays_from = rays_from
        if self.rays_from == "get_rays_np":
            K_host = np.asarray(torch.as_tensor(K).cpu())
            rays = [np.stack(helpers.get_rays_np(H, W, K_host, p), -2) for p in train_poses]
            rays = torch.from_numpy(np.stack(rays, 0).astype(np.float32)).reshape(-1, 2, 3)
            self.rays = rays.to(device) if self.on_device else rays

    @property
    def data_bytes(self) -> int:
        """Bytes of colours, and of rays where a fork's get_rays_np is followed."""
        return self.colour_bytes + (0 if self.rays is None else self.rays.numel() * self.rays.element_size())

    @property
    def home(self) -> torch.device:
        """Where the colours (and the indices into them) live."""
        return self.device if self.on_device else torch.device("cpu")

    def colours_at(self, index: torch.Tensor) -> torch.Tensor:
        """(N, 3) float32 colours on the device of the pixels `index` (N,)."""
        index = index.to(self.home, non_blocking=True).long()
        if self.fetch is None:
            rows = self.colours[index]
        else:
            rows = self.fetch(self.colours, index)
        return rows if self.table is None else self.table[rows.long()]

    def rays_of(self, index: torch.Tensor, image: Optional[int] = None) -> torch.Tensor:
        """(2, N, 3) [rays_o, rays_d] of the pixels `index` (N,): image index // (H W),
        row and column from the remainder. `image`: the position of the one
        training image they all lie in, if known (needed to call get_rays)."""
        if self.rays is not None:
            rows = self.rays[index.to(self.home, non_blocking=True).long()]
            return rows.to(self.device, non_blocking=True).transpose(0, 1)
        index = index.to(self.device, non_blocking=True).long()
        k, rest = index // (self.H * self.W), index % (self.H * self.W)
        if self.rays_from == "get_rays":
            rays = helpers.get_rays(self.H, self.W, self.K, self.poses[image])
            return torch.stack([r.reshape(-1, 3)[rest] for r in rays], 0)
        rays_o, rays_d = rays_at(self.K, self.poses[k], rest // self.W, rest % self.W)
        return torch.stack([rays_o, rays_d], 0)


class RayBatcher:
    """Every pixel of the training images, through one shared permutation.

    Draws follow the original: a NumPy shuffle first, then torch.randperm
    after each epoch; the pixels stay in place and the permutation (int32
    below 2^31 pixels) indexes them. With the colours as uint8 that is
    3 bytes per training pixel on the device and the permutation's 4 in host
    memory, from which each step copies its N_rand indices (36 + 8 bytes on
    the device for a buffer of precomputed rays). Over `device_budget_bytes`
    the colours stay in pinned host memory too and batches are prefetched
    one step ahead.
    """

    def __init__(self, images, poses: np.ndarray, i_train, H: int, W: int, K, N_rand: int,
                 device: torch.device, device_budget_bytes: Optional[float] = None,
                 rank: int = 0, world_size: int = 1,
                 share_permutation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.share = share_size(N_rand, rank, world_size)
        self.share_permutation = share_permutation            # data-parallel: rank 0's reshuffle, everywhere
        n_pixels = len(i_train) * H * W
        perm = np.arange(n_pixels, dtype=np.int32 if n_pixels < 2 ** 31 else np.int64)
        np.random.shuffle(perm)                             # the draws of np.random.permutation(n_pixels)
        self.pixels = TrainingPixels(images, poses, i_train, H, W, K, device, device_budget_bytes)
        self.fetch = self.pixels.fetch
        self.perm = torch.from_numpy(perm)                  # host memory: each step copies its N_rand indices
        self.N_rand, self.rank = N_rand, rank
        self.i_batch = 0
        self.ahead = None                                   # (i_batch, colours) prefetched

    @property
    def bytes_per_pixel(self) -> float:
        """Bytes of training data per training pixel: colours (and rays) plus permutation."""
        perm_bytes = self.perm.numel() * self.perm.element_size()
        return (self.pixels.data_bytes + perm_bytes) / self.pixels.n_pixels

    @property
    def device_bytes_per_pixel(self) -> float:
        """Of those, the bytes on the training device: the colours, when they fit
        its budget (the permutation stays in host memory)."""
        return self.pixels.data_bytes / self.pixels.n_pixels if self.pixels.on_device else 0.0

    def _index(self, i_batch: int) -> torch.Tensor:
        """This rank's share of the pixels of the batch starting at i_batch
        (the epoch's last batch may be short, and so some shares)."""
        start = i_batch + self.rank * self.share
        return self.perm[start:start + self.share]

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = self._index(self.i_batch)
        if self.ahead is not None and self.ahead[0] == self.i_batch:
            target_s = self.ahead[1]
        else:
            target_s = self.pixels.colours_at(index)
        batch_rays = self.pixels.rays_of(index)
        self.ahead = None
        self.i_batch += self.N_rand
        if self.i_batch >= self.perm.shape[0]:
            shuffle = torch.randperm(self.perm.shape[0])           # host, CPU generator, wherever the colours are
            if self.share_permutation is not None:
                shuffle = self.share_permutation(shuffle)
            self.perm = self.perm[shuffle]
            self.i_batch = 0
        if self.fetch is not None:
            self.ahead = (self.i_batch, self.pixels.colours_at(self._index(self.i_batch)))
        return batch_rays, target_s

    def state_dict(self) -> dict:
        small = self.perm.shape[0] < 2 ** 31
        return {"perm": self.perm.to(torch.int32 if small else torch.int64).cpu(), "i_batch": self.i_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["perm"].shape[0] != self.perm.shape[0]:
            raise ValueError(f"batcher state holds {state['perm'].shape[0]} rays, the scene has {self.perm.shape[0]}")
        self.perm = state["perm"].to(self.perm.dtype).to(self.perm.device)
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

    def __init__(self, images, poses: np.ndarray, i_train, H: int, W: int, K, N_rand: int,
                 precrop_iters: int, precrop_frac: float, device: torch.device,
                 device_budget_bytes: Optional[float] = None, rank: int = 0, world_size: int = 1):
        self.share = share_size(N_rand, rank, world_size)
        self.pixels = TrainingPixels(images, poses, i_train, H, W, K, device, device_budget_bytes, "get_rays")
        self.fetch = self.pixels.fetch
        self.i_train = np.asarray(i_train)
        self.position = {int(i): k for k, i in enumerate(self.i_train)}
        self.H, self.W, self.N_rand, self.rank = H, W, N_rand, rank
        self.precrop_iters, self.precrop_frac = precrop_iters, precrop_frac

    @property
    def device_bytes_per_pixel(self) -> float:
        """Of those, the bytes on the training device (within its budget)."""
        return self.bytes_per_pixel if self.pixels.on_device else 0.0

    @property
    def bytes_per_pixel(self) -> float:
        """Bytes of training data per training pixel: the colours."""
        return self.pixels.colour_bytes / self.pixels.n_pixels

    def window(self, step: int) -> Tuple[int, int, int, int]:
        """(first row, first column, rows, columns) of the pixels to draw from."""
        H, W = self.H, self.W
        if step < self.precrop_iters:
            dH, dW = int(H // 2 * self.precrop_frac), int(W // 2 * self.precrop_frac)
            return H // 2 - dH, W // 2 - dW, 2 * dH, 2 * dW
        return 0, 0, H, W

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_i = int(np.random.choice(self.i_train))
        r0, c0, h, w = self.window(step)
        flat = draw_distinct(h * w, self.N_rand)[self.rank * self.share:(self.rank + 1) * self.share]
        flat = torch.from_numpy(flat)
        index = (self.position[img_i] * self.H + flat // w + r0) * self.W + flat % w + c0
        index = index.to(self.pixels.home, non_blocking=True)     # the host does not wait for the device
        return self.pixels.rays_of(index, self.position[img_i]), self.pixels.colours_at(index)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
