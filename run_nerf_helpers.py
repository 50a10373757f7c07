"""NeRF building blocks: positional encoding, the MLP, camera rays, NDC and
hierarchical sampling, plus the small image metrics used in training.

Shapes use these letters: N rays, S samples per ray, C channels, H x W pixels.
Every function builds its new tensors on the device and in the dtype of its
inputs, so the same code runs on CPU, CUDA and MPS.
"""
import ctypes
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- Metrics -----------------------------------------------------------------

def img2mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two images of any (equal) shape."""
    return torch.mean((x - y) ** 2)


def mse2psnr(x: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for images in [0, 1]: -10 log10(MSE)."""
    return -10.0 * torch.log10(x)


def to8b(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, clipping first (the original's conversion)."""
    return (255 * np.clip(x, 0, 1)).astype(np.uint8)


def default_device() -> torch.device:
    """CUDA if present, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def keep_freed_memory() -> bool:
    """Asks glibc's allocator to keep freed memory for reuse instead of handing
    large blocks back to the system, which made every training step pay for
    fresh page faults on its activations (about 20% of a small CPU step).
    Changes no result. Returns False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


# --- Positional encoding -----------------------------------------------------

class Embedder(nn.Module):
    """gamma(x) = [x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)].

    Input (..., d); output (..., d + 2 d L). The frequencies are exact powers
    of two, so one broadcast multiply gives the same numbers as a loop over them.

    `Embedder(multires)` is this project's short form; the original's keywords
    work too: `Embedder(include_input=True, input_dims=3, max_freq_log2=L-1,
    num_freqs=L, log_sampling=True, periodic_fns=[torch.sin, torch.cos])`,
    frequencies 2^linspace(0, max_freq_log2, num_freqs) (log_sampling) or
    linspace(1, 2^max_freq_log2, num_freqs), each giving [fn(x f) for fn in
    periodic_fns], with x in front when include_input.
    """

    def __init__(self, multires: Optional[int] = None, input_dims: int = 3, include_input: bool = True,
                 max_freq_log2: Optional[float] = None, num_freqs: Optional[int] = None, log_sampling: bool = True,
                 periodic_fns: Sequence[Callable] = (torch.sin, torch.cos)):
        super().__init__()
        if multires is not None:
            num_freqs, max_freq_log2 = multires, multires - 1
        self.input_dims = input_dims
        self.include_input = include_input
        self.periodic_fns = tuple(periodic_fns)
        self.out_dim = input_dims * (int(include_input) + len(self.periodic_fns) * num_freqs)
        if log_sampling:
            freq_bands = 2.0 ** torch.linspace(0.0, max_freq_log2, num_freqs)
        else:
            freq_bands = torch.linspace(2.0 ** 0.0, 2.0 ** max_freq_log2, num_freqs)
        self.register_buffer("freq_bands", freq_bands, persistent=False)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """gamma(inputs): (..., d) -> (..., out_dim)."""
        freqs = self.freq_bands.to(device=inputs.device, dtype=inputs.dtype, non_blocking=True)
        scaled = inputs[..., None, :] * freqs[:, None]                                    # (..., L, d)
        periodic = torch.stack([fn(scaled) for fn in self.periodic_fns], -2).flatten(-3)  # (..., L P d)
        return torch.cat(([inputs] if self.include_input else []) + [periodic], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def get_embedder(multires: int, i: int = 0) -> Tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Returns (encoding function, output width); i = -1 gives the identity (width 3)."""
    if i == -1:
        return nn.Identity(), 3
    embedder = Embedder(multires)
    return embedder, embedder.out_dim


# --- The MLP -----------------------------------------------------------------

class NeRF(nn.Module):
    """The NeRF MLP: D ReLU layers of width W with the encoded points fed again
    (in front of the hidden features) after each layer listed in `skips`.

    With `use_viewdirs` the density comes from the last hidden layer and the
    colour from one extra layer that also sees the encoded view direction.
    Input (..., input_ch + input_ch_views); output (..., 4) = [rgb, sigma]
    (pre-activation), or (..., output_ch) without view directions.
    Parameter names match the original so its checkpoints load strictly.
    """

    def __init__(self, D: int = 8, W: int = 256, input_ch: int = 3, input_ch_views: int = 3,
                 output_ch: int = 4, skips: Sequence[int] = (4,), use_viewdirs: bool = False):
        super().__init__()
        self.D, self.W = D, W
        self.input_ch, self.input_ch_views = input_ch, input_ch_views
        self.skips = list(skips)
        self.use_viewdirs = use_viewdirs

        layers = [nn.Linear(input_ch, W)]
        for i in range(D - 1):
            layers.append(nn.Linear(W + input_ch if i in self.skips else W, W))
        self.pts_linears = nn.ModuleList(layers)
        # Built even without view directions (then unused), as in the original:
        # its checkpoints and optimizer states hold these parameters.
        self.views_linears = nn.ModuleList([nn.Linear(input_ch_views + W, W // 2)])
        if use_viewdirs:
            self.feature_linear = nn.Linear(W, W)
            self.alpha_linear = nn.Linear(W, 1)
            self.rgb_linear = nn.Linear(W // 2, 3)
        else:
            self.output_linear = nn.Linear(W, output_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_pts, input_views = torch.split(x, [self.input_ch, self.input_ch_views], dim=-1)
        h = input_pts
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([input_pts, h], -1)
        if not self.use_viewdirs:
            return self.output_linear(h)
        alpha = self.alpha_linear(h)
        h = torch.cat([self.feature_linear(h), input_views], -1)
        for layer in self.views_linears:
            h = F.relu(layer(h))
        return torch.cat([self.rgb_linear(h), alpha], -1)

    def load_weights_from_keras(self, weights: Sequence[np.ndarray]) -> None:
        """Loads the original TensorFlow release's Keras weight list: (kernel
        (in, out), bias) pairs of pts_linears 0..D-1, feature_linear,
        views_linears.0, rgb_linear, alpha_linear, in that order (view
        directions only, as in the original)."""
        if not self.use_viewdirs:
            raise ValueError("load_weights_from_keras: only for use_viewdirs=True networks (as in the original)")
        layers = list(self.pts_linears) + [self.feature_linear, self.views_linears[0], self.rgb_linear,
                                           self.alpha_linear]
        with torch.no_grad():
            for k, layer in enumerate(layers):
                layer.weight.copy_(torch.as_tensor(np.transpose(weights[2 * k])))
                layer.bias.copy_(torch.as_tensor(weights[2 * k + 1]))


# --- Rays --------------------------------------------------------------------

def get_rays(H: int, W: int, K, c2w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ray per pixel (i, j), i the column and j the row, no half-pixel offset.

    K: 3x3 intrinsics (array or tensor); c2w: (3, 4) camera-to-world.
    Returns rays_o, rays_d, each (H, W, 3), on c2w's device and dtype.
    """
    K = torch.as_tensor(K, dtype=c2w.dtype, device=c2w.device)
    i = torch.arange(W, dtype=c2w.dtype, device=c2w.device)[None, :].expand(H, W)
    j = torch.arange(H, dtype=c2w.dtype, device=c2w.device)[:, None].expand(H, W)
    dirs = torch.stack([(i - K[0][2]) / K[0][0], -(j - K[1][2]) / K[1][1], -torch.ones_like(i)], -1)
    rays_d = torch.sum(dirs[..., None, :] * c2w[:3, :3], -1)
    rays_o = c2w[:3, -1].expand(rays_d.shape)
    return rays_o, rays_d


def get_rays_np(H: int, W: int, K: np.ndarray, c2w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """NumPy twin of `get_rays`: rays_o, rays_d, each (H, W, 3)."""
    i, j = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32), indexing="xy")
    dirs = np.stack([(i - K[0][2]) / K[0][0], -(j - K[1][2]) / K[1][1], -np.ones_like(i)], -1)
    rays_d = np.sum(dirs[..., None, :] * c2w[:3, :3], -1)
    rays_o = np.broadcast_to(c2w[:3, -1], np.shape(rays_d))
    return rays_o, rays_d


def ndc_intrinsics(H: int, W: int, focal) -> Tuple[float, float, float, float]:
    """(fx, fy, cx, cy) from `ndc_rays`' `focal`: a number (the original's
    centred pinhole, fx = fy = focal, cx = W/2, cy = H/2) or a 3x3 K."""
    if np.ndim(focal) == 0:
        return float(focal), float(focal), W / 2.0, H / 2.0
    return float(focal[0][0]), float(focal[1][1]), float(focal[0][2]), float(focal[1][2])


def ndc_rays(H: int, W: int, focal, near: float, rays_o: torch.Tensor,
             rays_d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward-facing rays into normalised device coordinates (z in [-1, 1]).

    `focal`: the focal length (principal point at the image centre, as in the
    original) or the 3x3 intrinsics K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].
    Origins are first moved along their rays to the plane z = -near; then
    o' = (sx ox/oz + tx, sy oy/oz + ty, 1 + 2 near/oz) and
    d' = (sx (dx/dz - ox/oz), sy (dy/dz - oy/oz), -2 near/oz), with
    sx = -fx/(W/2), sy = -fy/(H/2), tx = 2 cx/W - 1, ty = 1 - 2 cy/H.

    Derivation: pixel column i looks along x/z = -(i - cx)/fx, row j along
    y/z = (j - cy)/fy (get_rays). NDC maps the image's edges to +-1:
    x' = 2 i/W - 1 = sx x/z + tx and y' = 1 - 2 j/H = sy y/z + ty. With cx = W/2,
    cy = H/2 and fx = fy = focal, tx = ty = 0: the original's map. Along a
    ray o + t d, x/z = ox/oz + s (dx/dz - ox/oz) with s = 1 - oz/(oz + t dz),
    the same s for all three coordinates, so rays stay straight lines
    o' + s d' (the shift t moves origins only).
    rays_o, rays_d: (..., 3) -> same shapes.
    """
    fx, fy, cx, cy = ndc_intrinsics(H, W, focal)
    t = -(near + rays_o[..., 2]) / rays_d[..., 2]
    rays_o = rays_o + t[..., None] * rays_d

    ox_oz = rays_o[..., 0] / rays_o[..., 2]
    oy_oz = rays_o[..., 1] / rays_o[..., 2]
    sx = -1.0 / (W / (2.0 * fx))
    sy = -1.0 / (H / (2.0 * fy))
    tx = 2.0 * cx / W - 1.0
    ty = 1.0 - 2.0 * cy / H
    o0 = sx * ox_oz + tx
    o1 = sy * oy_oz + ty
    o2 = 1.0 + 2.0 * near / rays_o[..., 2]
    d0 = sx * (rays_d[..., 0] / rays_d[..., 2] - ox_oz)
    d1 = sy * (rays_d[..., 1] / rays_d[..., 2] - oy_oz)
    d2 = -2.0 * near / rays_o[..., 2]
    return torch.stack([o0, o1, o2], -1), torch.stack([d0, d1, d2], -1)


# --- Hierarchical sampling ---------------------------------------------------

def pytest_uniform(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The original's `pytest=True` draws, which replace its random numbers in
    tests: `np.random.seed(0); np.random.rand(*shape)` (reseeding NumPy's
    global generator, as the original does), in `like`'s dtype and device."""
    np.random.seed(0)
    return torch.as_tensor(np.random.rand(*shape), dtype=like.dtype, device=like.device)


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, N_samples: int,
               det: bool = False, pytest: bool = False, u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse-transform sampling of the piecewise-constant PDF given by `weights`.

    bins: (N, B+1) bin edges; weights: (N, B). Weights get 1e-5 added and are
    normalised; the CDF starts at 0. u is linspace(0, 1, N_samples) with `det`,
    else uniform (`pytest_uniform` with `pytest`, or the given `u`,
    (N, N_samples)). Returns (N, N_samples).
    """
    weights = weights + 1e-5
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], -1)                    # (N, B+1)

    if u is None:
        shape = list(cdf.shape[:-1]) + [N_samples]
        if det:
            u = torch.linspace(0.0, 1.0, N_samples, dtype=cdf.dtype, device=cdf.device).expand(shape)
        elif pytest:
            u = pytest_uniform(shape, cdf)
        else:
            u = torch.rand(shape, dtype=cdf.dtype, device=cdf.device)
    u = u.contiguous()

    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp(inds - 1, min=0)
    above = torch.clamp(inds, max=cdf.shape[-1] - 1)
    cdf_below, cdf_above = torch.gather(cdf, -1, below), torch.gather(cdf, -1, above)
    bins_below, bins_above = torch.gather(bins, -1, below), torch.gather(bins, -1, above)

    denom = cdf_above - cdf_below
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    t = (u - cdf_below) / denom
    return bins_below + t * (bins_above - bins_below)
