"""The pixel-based training data (nerf/ray_batches.py) against independent
computations: a re-implementation of the former batcher that stored
[rays_o, rays_d, rgb] (9 float32) for every training pixel, and `get_rays`
on whole images. Real fern (images_8) and lego views, a few of each.
"""
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from nerf.checkpoints import rng_state, set_rng_state
from nerf.datasets import EightBitImages, composite
from load_blender import read_split, read_transforms
from load_llff import list_images, load_llff_data
from nerf.ray_batches import ImageRaySampler, RayBatcher, draw_distinct, eight_bit_values, training_colours
from run_nerf_helpers import get_rays

CPU = torch.device("cpu")


class NineFloatBatcher:
    """The former RayBatcher: every training pixel's rays and colour as a row
    [rays_o, rays_d, rgb] (M, 3, 3), np.random.permutation once, then
    perm[torch.randperm] after each epoch (drawn by the CPU generator, as the
    original's torch.randperm without a device), the rows on `device`."""

    def __init__(self, images, poses, i_train, H, W, K, N_rand, device=CPU):
        rows = []
        for i in i_train:
            rays_o, rays_d = get_rays(H, W, K, torch.from_numpy(poses[i]).to(device))
            rgb = torch.from_numpy(np.asarray(images[i][..., :3], dtype=np.float32)).to(device)
            rows.append(torch.stack([rays_o, rays_d, rgb], 2))
        self.rays_rgb = torch.stack(rows, 0).reshape(-1, 3, 3)
        self.perm = torch.from_numpy(np.random.permutation(self.rays_rgb.shape[0])).to(device)
        self.N_rand, self.i_batch = N_rand, 0

    def __call__(self, step):
        batch = torch.transpose(self.rays_rgb[self.perm[self.i_batch:self.i_batch + self.N_rand]], 0, 1)
        self.i_batch += self.N_rand
        if self.i_batch >= self.rays_rgb.shape[0]:
            self.perm = self.perm[torch.randperm(self.perm.shape[0]).to(self.perm.device)]
            self.i_batch = 0
        return batch[:2], batch[2]

    def state_dict(self):
        return {"perm": self.perm.to(torch.int32).cpu(), "i_batch": self.i_batch}


def reference_image_batch(images, poses, i_train, H, W, K, N_rand, step, precrop_iters, precrop_frac, device=CPU):
    """The --no_batching draw: np.random.choice of the image, draw_distinct of
    its pixels (in the centre crop early on); rays from get_rays of the whole image."""
    img_i = int(np.random.choice(i_train))
    r0, c0, h, w = 0, 0, H, W
    if step < precrop_iters:
        dH, dW = int(H // 2 * precrop_frac), int(W // 2 * precrop_frac)
        r0, c0, h, w = H // 2 - dH, W // 2 - dW, 2 * dH, 2 * dW
    flat = torch.from_numpy(draw_distinct(h * w, N_rand)).to(device)
    rows, cols = flat // w + r0, flat % w + c0
    rays_o, rays_d = get_rays(H, W, K, torch.from_numpy(poses[img_i]).to(device))
    target = torch.from_numpy(np.asarray(images[img_i][..., :3], dtype=np.float32)).to(device)[rows, cols]
    return torch.stack([rays_o[rows, cols], rays_d[rows, cols]], 0), target


def intrinsics(H, W, focal):
    return np.array([[focal, 0, 0.5 * W], [0, focal, 0.5 * H], [0, 0, 1]])


@pytest.fixture(scope="module")
def fern(fern_dir):
    """fern images_8: float32 colours as loaded, their 8-bit values, poses, K."""
    images, poses, _, _, _ = load_llff_data(str(fern_dir), factor=8)
    values, _, _, _, _ = load_llff_data(str(fern_dir), factor=8, eight_bit=True)
    H, W, focal = poses[0, :3, -1]
    return images, values, poses[:, :3, :4], int(H), int(W), intrinsics(H, W, focal)


def lego_views(lego_dir, n, white_bkgd, half_res=False):
    """The first n training views of lego, composited as load_scene does."""
    meta = read_transforms(lego_dir, "train")
    meta["frames"] = meta["frames"][:n]
    images, poses = read_split(lego_dir, meta, 1, half_res)
    images = composite(images, white_bkgd)
    H, W = images.shape[1:3]
    focal = .5 * W / np.tan(.5 * float(meta["camera_angle_x"]))
    return images, poses[:, :3, :4], H, W, intrinsics(H, W, focal)


def seed(s):
    np.random.seed(s)
    torch.manual_seed(s)


def assert_same(got, want):
    (rays, target), (rays_w, target_w) = got, want
    assert torch.equal(rays, rays_w) and torch.equal(target, target_w)


# --- ray batching: the same batches as the 9-float buffer -------------------

@pytest.mark.parametrize("kind", ["fern_float", "fern_eight_bit", "fern_pinned", "lego_white"])
def test_batches_are_the_nine_float_batchers_over_epochs_and_a_resume(kind, fern, lego_dir):
    if kind.startswith("fern"):
        colours, values, poses, H, W, K = fern
        images, i_train = (colours if kind == "fern_float" else EightBitImages(values)), [1, 5, 9]
    else:
        colours, poses, H, W, K = lego_views(lego_dir, 3, white_bkgd=True, half_res=True)
        images, i_train = colours, [0, 2]
    N_rand = 70000                                 # not a divisor: each epoch ends with a short batch
    budget = 0 if kind == "fern_pinned" else None

    seed(0)
    ref = NineFloatBatcher(colours, poses, i_train, H, W, K, N_rand)
    n_steps = 2 * len(ref.perm) // N_rand + 3      # over two epochs
    half = n_steps // 2
    want = [ref(step) for step in range(1, half)]
    state, rng = ref.state_dict(), rng_state()     # a checkpoint as the former batcher wrote it
    want += [ref(step) for step in range(half, n_steps)]

    seed(0)
    batcher = RayBatcher(images, poses, i_train, H, W, K, N_rand, CPU, device_budget_bytes=budget)
    assert (batcher.fetch is not None) == (kind == "fern_pinned")
    assert batcher.pixels.colours.dtype == (torch.float32 if kind == "lego_white" else torch.uint8)
    for step in range(1, n_steps):
        assert_same(batcher(step), want[step - 1])
        if step == half - 1:
            assert batcher.state_dict().keys() == state.keys()
            assert torch.equal(batcher.state_dict()["perm"], state["perm"])

    seed(99)
    resumed = RayBatcher(images, poses, i_train, H, W, K, N_rand, CPU, device_budget_bytes=budget)
    resumed.load_state_dict(state)
    set_rng_state(rng)
    for step in range(half, n_steps):
        assert_same(resumed(step), want[step - 1])


def test_permutation_is_numpys():
    """The int32 shuffle in place draws np.random.permutation's permutation."""
    images = np.random.default_rng(0).random((2, 30, 40, 3), dtype=np.float32)
    poses = np.tile(np.eye(4, dtype=np.float32)[:3], (2, 1, 1))
    np.random.seed(5)
    want = np.random.permutation(2 * 30 * 40)
    np.random.seed(5)
    batcher = RayBatcher(images, poses, [0, 1], 30, 40, intrinsics(30, 40, 50.0), 64, CPU)
    assert batcher.perm.dtype == torch.int32 and np.array_equal(batcher.perm.numpy(), want)


# --- --no_batching: the same draws and rays as get_rays on the whole image ---

@pytest.mark.parametrize("kind", ["fern_eight_bit", "fern_pinned", "lego_white"])
def test_image_sampler_batches_are_get_rays_of_the_drawn_pixels(kind, fern, lego_dir):
    if kind.startswith("fern"):
        colours, values, poses, H, W, K = fern
        images, i_train = EightBitImages(values), [2, 3, 11]
    else:
        colours, poses, H, W, K = lego_views(lego_dir, 3, white_bkgd=True, half_res=True)
        images, i_train = colours, [0, 1, 2]
    budget = 0 if kind == "fern_pinned" else None
    seed(1)
    sampler = ImageRaySampler(images, poses, i_train, H, W, K, 500, 3, 0.5, CPU, device_budget_bytes=budget)
    assert sampler.pixels.colours.dtype == (torch.float32 if kind == "lego_white" else torch.uint8)
    seed(1)
    for step in range(1, 8):
        state = np.random.get_state()
        got = sampler(step)
        np.random.set_state(state)
        assert_same(got, reference_image_batch(colours, poses, i_train, H, W, K, 500, step, 3, 0.5))


# --- what is stored ----------------------------------------------------------

def test_eight_bit_images_are_stored_as_their_file_values(fern_dir, fern):
    images, values, _, H, W, _ = fern
    files = list_images(fern_dir / "images_8")
    for k in (0, 7):
        assert np.array_equal(values[k], iio.imread(files[k])[..., :3])
    stored = training_colours(images, [0, 7])      # detected from the float32 colours
    assert stored.dtype == torch.uint8 and np.array_equal(stored.numpy(), values[[0, 7]])
    as_loaded = EightBitImages(values)
    assert np.array_equal(as_loaded[[0, 7]].view(np.uint32), images[[0, 7]].view(np.uint32))
    assert np.array_equal(np.asarray(as_loaded).view(np.uint32), images.view(np.uint32))


def test_only_exact_eight_bit_colours_are_stored_as_uint8(lego_dir, fern):
    alpha_dropped = lego_views(lego_dir, 2, white_bkgd=False)[0]
    assert training_colours(alpha_dropped, [0, 1]).dtype == torch.uint8
    assert training_colours(lego_views(lego_dir, 2, white_bkgd=True)[0], [0, 1]).dtype == torch.float32
    assert training_colours(lego_views(lego_dir, 2, white_bkgd=False, half_res=True)[0], [0, 1]).dtype \
        == torch.float32
    image = fern[0][3]
    assert eight_bit_values(image) is not None
    for changed in (np.nextafter(image[5, 6, 1], np.float32(2)), np.float32(0.5), np.float32(-0.0)):
        bad = image.copy()
        bad[5, 6, 1] = changed
        assert eight_bit_values(bad) is None


def test_bytes_per_training_pixel(fern, lego_dir):
    """uint8 colours on the device and an int32 permutation in host memory:
    3 + 4 bytes a pixel (36 + 8 on the device before)."""
    images, values, poses, H, W, K = fern
    batcher = RayBatcher(EightBitImages(values), poses, [0, 1], H, W, K, 1024, CPU)
    assert batcher.bytes_per_pixel == 7 and batcher.device_bytes_per_pixel == 3
    assert batcher.perm.device.type == "cpu"
    sampler = ImageRaySampler(EightBitImages(values), poses, [0, 1], H, W, K, 1024, 0, .5, CPU)
    assert sampler.bytes_per_pixel == sampler.device_bytes_per_pixel == 3
    white, poses, H, W, K = lego_views(lego_dir, 1, white_bkgd=True, half_res=True)
    lego = RayBatcher(white, poses, [0], H, W, K, 1024, CPU)
    assert lego.bytes_per_pixel == 12 + 4 and lego.device_bytes_per_pixel == 12
    assert RayBatcher(white, poses, [0], H, W, K, 1024, CPU, device_budget_bytes=0).device_bytes_per_pixel == 0


# --- shares for data-parallel training ----------------------------------------

@pytest.mark.parametrize("no_batching", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_shares_make_the_single_process_batch(fern, no_batching, world_size):
    _, values, poses, H, W, K = fern
    images, i_train = EightBitImages(values), [0, 4]
    N_rand = 6000 if no_batching else 60000         # 8 batches of 60000 cross an epoch, its last batch short

    def make(rank, size):
        if no_batching:
            return ImageRaySampler(images, poses, i_train, H, W, K, N_rand, 2, 0.5, CPU,
                                   rank=rank, world_size=size)
        return RayBatcher(images, poses, i_train, H, W, K, N_rand, CPU, rank=rank, world_size=size)

    runs = []
    for rank, size in [(0, 1)] + [(r, world_size) for r in range(world_size)]:
        seed(2)
        sampler = make(rank, size)
        runs.append(([sampler(step) for step in range(1, 9)], sampler.state_dict()))
    (single, state), shares = runs[0], runs[1:]
    for step, (rays, target) in enumerate(single):
        assert torch.equal(torch.cat([s[step][0] for s, _ in shares], 1), rays)
        assert torch.equal(torch.cat([s[step][1] for s, _ in shares], 0), target)
        if not no_batching and step < 3:
            assert all(s[step][1].shape[0] == N_rand // world_size for s, _ in shares)
    for _, rank_state in shares:
        assert rank_state.keys() == state.keys() and all(torch.equal(torch.as_tensor(rank_state[k]),
                                                                     torch.as_tensor(state[k])) for k in state)
    with pytest.raises(ValueError, match="does not split"):
        RayBatcher(images, poses, i_train, H, W, K, 1000, CPU, rank=0, world_size=3)
    with pytest.raises(ValueError, match="does not split"):
        ImageRaySampler(images, poses, i_train, H, W, K, 1000, 0, 0.5, CPU, rank=1, world_size=3)


# --- GPU tier: the same batches where the rays and colours are made on CUDA ---

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU tier)")
@pytest.mark.parametrize("budget", [None, 0])                 # on the device; pinned host memory
def test_on_cuda_batches_are_the_former_ones(fern, budget):
    colours, values, poses, H, W, K = fern
    cuda, i_train = torch.device("cuda"), [1, 5, 9]
    seed(0)
    ref = NineFloatBatcher(colours, poses, i_train, H, W, K, 70000, device=cuda)
    want = [ref(step) for step in range(1, 12)]                # crosses an epoch
    seed(0)
    batcher = RayBatcher(EightBitImages(values), poses, i_train, H, W, K, 70000, cuda, device_budget_bytes=budget)
    assert (batcher.fetch is not None) == (budget == 0)
    for step in range(1, 12):
        assert_same(batcher(step), want[step - 1])
    seed(1)
    sampler = ImageRaySampler(EightBitImages(values), poses, i_train, H, W, K, 4096, 3, 0.5, cuda,
                              device_budget_bytes=budget)
    seed(1)
    for step in range(1, 6):
        state = np.random.get_state()
        got = sampler(step)
        np.random.set_state(state)
        assert_same(got, reference_image_batch(colours, poses, i_train, H, W, K, 4096, step, 3, 0.5, cuda))
