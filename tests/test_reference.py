"""Pixel parity with the original implementation: its saved weights rendered
by this code must give its saved maps (reference/README.md describes the files)."""
import numpy as np
import pytest
import torch

from nerf import rendering
from run_nerf_helpers import NeRF, get_embedder

CASES = ["render_llff_ndc_fine.pt", "render_blender_white_fine.pt"]
MAPS = ["rgb_map", "disp_map", "acc_map", "rgb0", "disp0", "acc0", "z_std"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small images through small networks: one thread is several times faster
    than the intra-op pool on a shared, busy CPU. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_network(state_dict):
    net = NeRF(D=4, W=64, skips=[2], use_viewdirs=True, input_ch=63, input_ch_views=27, output_ch=5)
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


def render_case(ref, chunk, netchunk):
    cfg = ref["config"]
    H, W, focal = int(cfg["H"]), int(cfg["W"]), float(cfg["focal"])
    K = np.array([[focal, 0, 0.5 * W], [0, focal, 0.5 * H], [0, 0, 1]])
    embed, _ = get_embedder(cfg["multires"])
    embeddirs, _ = get_embedder(cfg["multires_views"])
    query = lambda pts, viewdirs, fn: rendering.run_network(pts, viewdirs, fn, embed, embeddirs, netchunk=netchunk)
    with torch.no_grad():
        rgb, disp, acc, extras = rendering.render(
            H, W, K, chunk=chunk, c2w=ref["c2w"], ndc=cfg["ndc"], near=cfg["near"], far=cfg["far"],
            use_viewdirs=True, network_fn=reference_network(ref["network_fn_state_dict"]),
            network_fine=reference_network(ref["network_fine_state_dict"]), network_query_fn=query,
            N_samples=cfg["N_samples"], N_importance=cfg["N_importance"], perturb=0.0, raw_noise_std=0.0,
            white_bkgd=cfg["white_bkgd"], lindisp=cfg["lindisp"])
    return dict(rgb_map=rgb, disp_map=disp, acc_map=acc, **extras)


@pytest.fixture(scope="module", params=CASES)
def case(request, reference_dir):
    path = reference_dir / request.param
    if not path.exists():
        pytest.skip(f"{path} not found")
    return torch.load(path, weights_only=True)


def assert_matches(got, ref):
    for key in MAPS:
        want = ref[key]
        assert got[key].shape == want.shape, key
        diff = (got[key] - want).abs()
        assert torch.all(torch.isfinite(got[key])), key
        assert diff.max().item() <= 1e-2, f"{key}: max diff {diff.max().item():.3g}"
        frac = (diff > 1e-5).float().mean().item()
        assert frac <= 0.005, f"{key}: {100 * frac:.2f}% of pixels differ by more than 1e-5"


def test_reference_config_is_what_the_readme_says(case):
    cfg = case["config"]
    assert (cfg["netdepth"], cfg["netwidth"], cfg["skips"]) == (4, 64, [2])
    assert (cfg["multires"], cfg["multires_views"], cfg["use_viewdirs"]) == (10, 4, True)
    assert cfg["perturb"] == 0 and cfg["raw_noise_std"] == 0 and cfg["N_importance"] > 0


def test_reference_render(case):
    assert_matches(render_case(case, chunk=1024 * 32, netchunk=1024 * 64), case)


def test_reference_render_small_chunks(case):
    # Sizes that divide nothing evenly: every pass ends on a partial chunk.
    assert_matches(render_case(case, chunk=37, netchunk=101), case)
