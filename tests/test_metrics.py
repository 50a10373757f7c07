"""Test-set scoring: PSNR, TF-style SSIM, LPIPS availability, metrics.json,
comparison images and the results table against the NeRF paper."""
import json
import logging
import math
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch.hub
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import eval_table
from nerf import lpips_vgg, metrics, scoring

REPO = Path(__file__).resolve().parents[1]
FERN_TEST_VIEWS = (0, 8, 16)  # llffhold 8 on fern's 20 images


def random_image(rng, h=24, w=32, c=3):
    """A float image already on the 8-bit grid."""
    return rng.integers(0, 256, size=(h, w, c)).astype(np.float64) / 255.0


def box_blur(img, radius=2):
    """Mean over a (2r+1)^2 window, edges replicated."""
    padded = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    k = 2 * radius + 1
    return sum(padded[i:i + h, j:j + w] for i in range(k) for j in range(k)) / k**2


def unavailable_lpips(tmp_path):
    """A scorer that cannot load, whatever is installed: its hub dir is empty."""
    scorer = lpips_vgg.LPIPSScorer(hub_dir=tmp_path / "empty_hub", download=False)
    assert not scorer.available
    return scorer


@pytest.fixture(scope="module")
def fern_views(fern_dir):
    """fern's test views at factor 8 as the loader gives them: float32 / 255."""
    files = sorted((fern_dir / "images_8").glob("*.png"))
    return [(imageio.imread(files[k])[..., :3] / 255.0).astype(np.float32)
            for k in FERN_TEST_VIEWS]


# ---------------------------------------------------------------- 8-bit


def test_quantize_8bit_is_to8b_divided_by_255():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 1.2, size=(7, 9, 3))
    expected = (255 * np.clip(x, 0, 1)).astype(np.uint8)
    np.testing.assert_array_equal(metrics.to_uint8(x), expected)
    np.testing.assert_array_equal(metrics.quantize_8bit(x) * 255, expected.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_keeps_images_that_came_from_8bit_files(dtype):
    levels = np.arange(256)
    loaded = (levels / 255.0).astype(dtype)  # what imread(...) / 255 gives
    np.testing.assert_array_equal(metrics.to_uint8(loaded), levels)


# ---------------------------------------------------------------- PSNR


def test_psnr_of_a_render_against_itself_is_infinite_not_capped():
    rng = np.random.default_rng(1)
    img = random_image(rng)
    assert metrics.psnr(img, img) == math.inf
    # Differences below one 8-bit level vanish in the paper's convention.
    nudged = np.clip(img + 0.3 / 255, 0, 1)
    assert metrics.psnr(nudged, img) < math.inf
    assert scoring.score_view(nudged, img)["psnr"] == math.inf


def test_psnr_against_a_known_mse():
    rng = np.random.default_rng(2)
    levels = rng.integers(10, 200, size=(20, 30, 3))
    render_levels = levels.copy()
    render_levels[:, :10] += 12  # a third of the pixels off by 12 levels
    gt, render = levels / 255, render_levels / 255
    known_mse = (12 / 255) ** 2 / 3
    assert metrics.mse(render, gt) == pytest.approx(known_mse, rel=1e-12)
    assert metrics.psnr(render, gt) == pytest.approx(-10 * math.log10(known_mse), abs=1e-9)
    assert scoring.score_view(render, gt)["psnr"] == pytest.approx(
        -10 * math.log10(known_mse), abs=1e-9)
    # max_val scales the peak: the same images on a 0..255 scale.
    assert metrics.psnr(render * 255, gt * 255, max_val=255.0) == pytest.approx(
        metrics.psnr(render, gt), abs=1e-9)


# ---------------------------------------------------------------- SSIM


def tf_ssim_brute_force(a, b, size=11, sigma=1.5, k1=0.01, k2=0.03, max_val=1.0):
    """tf.image.ssim written out window by window: TF's 2-D window is a
    softmax over -(x^2 + y^2) / (2 sigma^2); only fully inside windows."""
    coords = np.arange(size) - (size - 1) / 2
    logits = -(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2)
    win = np.exp(logits - logits.max())
    win /= win.sum()
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    h, w, c = a.shape
    per_channel = []
    for ch in range(c):
        vals = []
        for i in range(h - size + 1):
            for j in range(w - size + 1):
                pa, pb = a[i:i + size, j:j + size, ch], b[i:i + size, j:j + size, ch]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va = (win * pa * pa).sum() - ma**2
                vb = (win * pb * pb).sum() - mb**2
                cov = (win * pa * pb).sum() - ma * mb
                vals.append((2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
                            * (2 * cov + c2) / (va + vb + c2))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(3)
    img = random_image(rng, 40, 50)
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(img, box_blur(img)) < 0.9


def test_ssim_follows_tensorflow_window_and_valid_region():
    rng = np.random.default_rng(4)
    a = random_image(rng, 17, 23, 2)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert metrics.ssim_map(a, b).shape == (7, 13, 2)
    assert metrics.ssim(a, b) == pytest.approx(tf_ssim_brute_force(a, b), abs=1e-12)


def test_ssim_rejects_images_smaller_than_the_window_and_mismatched_shapes():
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(np.zeros((10, 40, 3)), np.zeros((10, 40, 3)))
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.ssim(np.zeros((20, 20, 3)), np.zeros((20, 21, 3)))


def test_ssim_agrees_with_scikit_image_on_real_fern_views(fern_views):
    gt = fern_views[0].astype(np.float64)
    rng = np.random.default_rng(5)
    noisy = metrics.quantize_8bit(gt + rng.normal(0, 0.04, gt.shape))
    blurred = metrics.quantize_8bit(box_blur(gt))
    scores = []
    for other in (noisy, blurred):
        ours = metrics.ssim(other, gt)
        reference = structural_similarity(
            other, gt, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=-1)
        assert abs(ours - reference) < 1e-4
        assert 0.2 < ours < 0.99  # a real degradation, not a trivial case
        scores.append(ours)
    assert abs(scores[0] - scores[1]) > 1e-3


# ---------------------------------------------------------------- LPIPS


def test_lpips_unavailable_is_reported_in_metrics_json(tmp_path):
    rng = np.random.default_rng(6)
    gts = [random_image(rng) for _ in range(2)]
    renders = [np.clip(g + rng.normal(0, 0.05, g.shape), 0, 1) for g in gts]
    scorer = unavailable_lpips(tmp_path)
    assert scorer.reason
    scoring.write_metrics_json(tmp_path / "testset_000010", 10, gts, renders,
                               scene="lego", dataset_type="blender", lpips_scorer=scorer)
    saved = json.loads((tmp_path / "testset_000010" / "metrics.json").read_text())
    assert saved["lpips"]["available"] is False
    assert saved["lpips"]["reason"] == scorer.reason
    assert saved["lpips"]["net"] == "vgg"
    assert saved["mean"]["lpips"] is None
    assert all(v["lpips"] is None for v in saved["views"])
    assert scorer.reason in scoring.summary_line(saved)


def test_lpips_of_identical_images_is_zero_when_available():
    scorer = lpips_vgg.default_lpips_scorer()
    if not scorer.available:
        pytest.skip(f"LPIPS unavailable: {scorer.reason}")
    rng = np.random.default_rng(7)
    img = random_image(rng, 64, 64)
    assert scorer(img, img) == pytest.approx(0.0, abs=1e-6)
    assert scorer(img, box_blur(img)) > 1e-3


STUB_LPIPS = textwrap.dedent('''
    """Stand-in for the lpips package: records how it is called."""
    import torch

    ATTEMPT_DOWNLOAD = False
    calls = []

    class LPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True, **kwargs):
            super().__init__()
            self.net = net
            self.hub_dir = torch.hub.get_dir()
            if ATTEMPT_DOWNLOAD:
                torch.hub.download_url_to_file("https://example.invalid/w.pth",
                                               self.hub_dir + "/downloaded.pth")

        def forward(self, a, b):
            calls.append((self.net, self.hub_dir, a.detach().clone(), b.detach().clone()))
            return ((a - b) ** 2).mean().reshape(1, 1, 1, 1)
''')


@pytest.fixture
def stub_lpips(tmp_path, monkeypatch):
    """lpips and torchvision stand-ins on sys.path, with their weight files."""
    site = tmp_path / "site"
    (site / "lpips" / "weights" / "v0.1").mkdir(parents=True)
    (site / "lpips" / "__init__.py").write_text(STUB_LPIPS)
    (site / "lpips" / "weights" / "v0.1" / "vgg.pth").write_bytes(b"stub")
    (site / "torchvision" / "models").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text("")
    (site / "torchvision" / "models" / "__init__.py").write_text(
        "class VGG16_Weights:\n"
        "    class IMAGENET1K_V1:\n"
        "        url = 'https://example.invalid/vgg16-stub.pth'\n")
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "vgg16-stub.pth").write_bytes(b"stub")
    for name in ("lpips", "torchvision", "torchvision.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(site))
    import lpips
    yield lpips, hub
    for name in ("lpips", "torchvision", "torchvision.models"):
        sys.modules.pop(name, None)  # monkeypatch then restores any real ones


def test_lpips_scorer_feeds_vgg_lpips_images_in_minus_one_one(stub_lpips):
    lpips, hub = stub_lpips
    scorer = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu")
    assert scorer.available, scorer.reason
    rng = np.random.default_rng(8)
    a, b = random_image(rng, 12, 16), random_image(rng, 12, 16)
    value = scorer(a, b)
    net, hub_seen, ta, tb = lpips.calls[-1]
    assert net == "vgg" and hub_seen == str(hub)
    assert ta.shape == (1, 3, 12, 16)
    np.testing.assert_allclose(ta[0].permute(1, 2, 0).numpy(), a * 2 - 1, atol=1e-6)
    assert value == pytest.approx(float(np.mean(((a - b) * 2) ** 2)), rel=1e-5)
    assert scorer(a, a) == 0.0


def test_lpips_scorer_never_downloads_while_building_the_model(stub_lpips):
    lpips, hub = stub_lpips
    lpips.ATTEMPT_DOWNLOAD = True
    scorer = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu", download=True)
    assert not scorer.available
    assert "refusing to download" in scorer.reason
    assert not (hub / "downloaded.pth").exists()


class FakeNetwork:
    """Stands in for torch.hub's download: counts calls, writes the file or
    fails as an offline machine does."""

    def __init__(self, online=True):
        self.online = online
        self.calls = []

    def __call__(self, url, dst, hash_prefix=None, progress=True):
        self.calls.append((url, dst, hash_prefix))
        if not self.online:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        Path(dst).write_bytes(b"vgg16 weights")


def test_lpips_fetches_the_vgg16_weights_once_into_the_hub_cache(stub_lpips, monkeypatch, caplog):
    lpips, hub = stub_lpips
    cached = hub / "checkpoints" / "vgg16-stub.pth"
    cached.unlink()
    network = FakeNetwork()
    monkeypatch.setattr(torch.hub, "download_url_to_file", network)
    with caplog.at_level(logging.INFO, logger="nerf"):
        first = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu", download=True)
        assert first.available, first.reason
    assert network.calls == [("https://example.invalid/vgg16-stub.pth", str(cached), None)]
    assert cached.read_bytes() == b"vgg16 weights"
    fetch_lines = [r.getMessage() for r in caplog.records if "fetching" in r.getMessage()]
    assert len(fetch_lines) == 1
    assert "https://example.invalid/vgg16-stub.pth" in fetch_lines[0] and str(cached) in fetch_lines[0]
    second = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu", download=True)
    assert second.available and len(network.calls) == 1
    rng = np.random.default_rng(10)
    a = random_image(rng, 12, 16)
    assert second(a, a) == 0.0


def test_lpips_fetch_checks_the_hash_the_file_name_carries(stub_lpips, monkeypatch):
    _, hub = stub_lpips
    network = FakeNetwork()
    monkeypatch.setattr(torch.hub, "download_url_to_file", network)
    dest = hub / "checkpoints" / "vgg16-397923af.pth"
    lpips_vgg.fetch_vgg16_weights("https://example.invalid/vgg16-397923af.pth", dest)
    assert network.calls == [("https://example.invalid/vgg16-397923af.pth", str(dest), "397923af")]


def test_lpips_offline_or_opted_out_is_unavailable_with_the_reason(stub_lpips, monkeypatch, tmp_path):
    _, hub = stub_lpips
    (hub / "checkpoints" / "vgg16-stub.pth").unlink()
    offline = FakeNetwork(online=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    scorer = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu", download=True)
    assert not scorer.available and len(offline.calls) == 1
    assert "could not fetch" in scorer.reason and "URLError" in scorer.reason and "offline?" in scorer.reason
    rng = np.random.default_rng(11)
    gts = [random_image(rng) for _ in range(2)]
    saved = scoring.write_metrics_json(tmp_path / "t", 1, gts, gts, scene="lego",
                                       dataset_type="blender", lpips_scorer=scorer)
    assert saved["mean"]["lpips"] is None and saved["lpips"]["reason"] == scorer.reason

    # Opted out: the flag or the environment variable; the network is never asked.
    monkeypatch.delenv(lpips_vgg.NO_DOWNLOAD_ENV, raising=False)
    assert lpips_vgg.downloads_allowed() and not lpips_vgg.downloads_allowed(no_download=True)
    for value, allowed in (("1", False), ("yes", False), ("0", True), ("", True)):
        monkeypatch.setenv(lpips_vgg.NO_DOWNLOAD_ENV, value)
        assert lpips_vgg.downloads_allowed() is allowed
    monkeypatch.setenv(lpips_vgg.NO_DOWNLOAD_ENV, "1")
    scorer = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu")
    assert not scorer.available and len(offline.calls) == 1
    assert "downloads are off" in scorer.reason and "vgg16-stub.pth" in scorer.reason


def test_lpips_reports_a_torchvision_that_does_not_import(stub_lpips):
    lpips, hub = stub_lpips
    (Path(lpips.__file__).parents[1] / "torchvision" / "models" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    scorer = lpips_vgg.LPIPSScorer(hub_dir=hub, device="cpu", download=True)
    assert not scorer.available
    assert scorer.reason.startswith("torchvision cannot be imported (RuntimeError: operator torchvision::nms")


def test_no_test_downloads():
    """conftest turns the fetch off for every test and every run they start."""
    assert not lpips_vgg.downloads_allowed()
    assert not lpips_vgg.default_lpips_scorer().download


# ---------------------------------------------------------------- metrics.json


def test_metrics_json_from_saved_pngs_matches_psnr_recomputed_from_them(fern_views, tmp_path):
    folder = tmp_path / "fern_test" / "testset_000500"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(9)
    renders = [np.clip(g + rng.normal(0, s, g.shape), 0, 1)
               for g, s in zip(fern_views, (0.01, 0.03, 0.06))]
    for k, r in enumerate(renders):  # what render_path saves
        imageio.imwrite(folder / f"{k:03d}.png", metrics.to_uint8(r))
    (folder / "video.mp4").write_bytes(b"not a render")
    gts = np.stack(fern_views)

    written = scoring.write_metrics_json(
        folder, 500, gts, scene="fern", dataset_type="llff",
        lpips_scorer=unavailable_lpips(tmp_path), extra={"factor": 8})
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["step"] == 500 and saved["scene"] == "fern"
    assert saved["dataset_type"] == "llff" and saved["factor"] == 8
    assert (saved["H"], saved["W"]) == gts.shape[1:3]
    assert [v["name"] for v in saved["views"]] == ["000.png", "001.png", "002.png"]
    assert saved["n_views"] == len(FERN_TEST_VIEWS)

    truth_8bit = [np.round(g.astype(np.float64) * 255) / 255 for g in fern_views]
    recomputed = [peak_signal_noise_ratio(t, imageio.imread(folder / f"{k:03d}.png") / 255.0,
                                          data_range=1.0)
                  for k, t in enumerate(truth_8bit)]
    assert saved["mean"]["psnr"] == pytest.approx(np.mean(recomputed), abs=1e-9)
    for view, value in zip(saved["views"], recomputed):
        assert view["psnr"] == pytest.approx(value, abs=1e-9)
    psnrs = [v["psnr"] for v in saved["views"]]
    assert psnrs[0] > psnrs[1] > psnrs[2]  # more noise, lower score

    # Scoring the in-memory renders gives exactly the numbers of their PNGs.
    direct = scoring.score_views(renders, gts, lpips_scorer=unavailable_lpips(tmp_path))
    assert direct["mean"] == written["mean"]


def test_metrics_json_is_strict_json_and_infinite_psnr_round_trips(tmp_path):
    rng = np.random.default_rng(10)
    gt = random_image(rng)
    other = np.clip(gt + 0.1, 0, 1)
    scoring.write_metrics_json(tmp_path, 3, [gt, gt], [gt, other], scene="lego",
                               dataset_type="blender", lpips_scorer=unavailable_lpips(tmp_path))
    text = (tmp_path / "metrics.json").read_text()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    raw = json.loads(text, parse_constant=no_constants)
    assert raw["views"][0]["psnr"] == "inf" and raw["mean"]["psnr"] == "inf"
    assert raw["views"][0]["mse"] == 0
    loaded = scoring.load_metrics(tmp_path)
    assert loaded["views"][0]["psnr"] == math.inf
    assert math.isfinite(loaded["views"][1]["psnr"])


def test_blender_ground_truth_is_matted_on_white_when_white_bkgd():
    rgba = np.zeros((16, 16, 4))
    rgba[4:12, 4:12] = [0.2, 0.4, 0.6, 1.0]  # opaque object, transparent elsewhere
    render = metrics.composite_on_white(rgba)
    assert render[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert scoring.score_view(render, rgba, white_bkgd=True)["psnr"] == math.inf
    assert scoring.score_view(render, rgba, white_bkgd=False)["psnr"] < 10


def test_mismatched_render_and_ground_truth_sizes_are_refused(tmp_path):
    rng = np.random.default_rng(11)
    with pytest.raises(ValueError, match="shape mismatch"):
        scoring.score_views([random_image(rng, 12, 16)], [random_image(rng, 24, 32)],
                            lpips_scorer=unavailable_lpips(tmp_path))
    with pytest.raises(ValueError, match="ground-truth"):
        scoring.score_views([random_image(rng)] * 2, [random_image(rng)],
                            lpips_scorer=unavailable_lpips(tmp_path))


def test_summary_line_and_tensorboard_scalars(tmp_path):
    rng = np.random.default_rng(12)
    gt = random_image(rng)
    m = scoring.write_metrics_json(tmp_path, 7, [gt], [np.clip(gt + 0.05, 0, 1)],
                                   scene="fern", dataset_type="llff",
                                   lpips_scorer=unavailable_lpips(tmp_path))
    line = scoring.summary_line(m)
    assert "\n" not in line
    assert "step 7" in line and "fern" in line and "32x24" in line
    assert f"PSNR {m['mean']['psnr']:.2f}" in line and "LPIPS n/a" in line
    scalars = scoring.tensorboard_scalars(m)
    assert scalars == {"test/psnr": m["mean"]["psnr"], "test/ssim": m["mean"]["ssim"]}
    m["mean"]["lpips"] = 0.25
    assert scoring.tensorboard_scalars(m, prefix="eval")["eval/lpips"] == 0.25


# ---------------------------------------------------------------- comparison


def test_comparison_image_is_render_truth_and_error_heat_map(tmp_path):
    rng = np.random.default_rng(13)
    gt = random_image(rng, 10, 12)
    gt[0, 0], gt[1, 1] = 0.1, 0.5
    render = gt.copy()
    render[0, 0] = 0.9  # far beyond err_max
    render[1, 1] = 0.5 + 5 / 255  # a small error
    img = scoring.comparison_image(render, gt, err_max=0.2)
    assert img.shape == (10, 36, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, :12], metrics.to_uint8(render))
    np.testing.assert_array_equal(img[:, 12:24], metrics.to_uint8(gt))
    heat = img[:, 24:]
    assert heat[5, 5].tolist() == [0, 0, 0]  # no error: black
    assert heat[0, 0].tolist() == [255, 255, 255]  # error >= err_max: white
    assert 0 < int(heat[1, 1].sum()) < 765

    ramp = scoring.error_colormap(np.linspace(0, 1, 50))
    brightness = ramp.astype(int).sum(axis=-1)
    assert np.all(np.diff(brightness) >= 0) and brightness[0] == 0 and brightness[-1] == 765

    paths = scoring.save_comparisons(tmp_path, [render, gt], [gt, gt])
    assert [p.name for p in paths] == ["000.png", "001.png"]
    assert imageio.imread(paths[0]).shape == (10, 36, 3)
    assert scoring.render_files(tmp_path) == []  # comparisons are not renders


# ---------------------------------------------------------------- results table


def test_paper_results_file_names_its_source_and_is_consistent():
    paper = eval_table.load_paper()
    assert "NeRF: Representing Scenes as Neural Radiance Fields" in paper["source"]["paper"]
    assert "ECCV 2020" in paper["source"]["venue"]
    expected = {
        "blender": ({"chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship"},
                    {"W": 800, "H": 800}),
        "llff": ({"room", "fern", "leaves", "fortress", "orchids", "flower", "trex", "horns"},
                 {"W": 1008, "H": 756}),
    }
    for key, (scenes, res) in expected.items():
        ds = paper["datasets"][key]
        assert set(ds["scenes"]) == scenes and ds["resolution"] == res
        for name, scores in ds["scenes"].items():
            assert set(scores) == {"psnr", "ssim", "lpips"}, name
            assert 15 < scores["psnr"] < 45 and 0 < scores["ssim"] < 1 and 0 < scores["lpips"] < 1
        # The per-scene values average to the paper's stated means (to rounding).
        for metric, tol in (("psnr", 0.01), ("ssim", 0.001), ("lpips", 0.001)):
            avg = np.mean([s[metric] for s in ds["scenes"].values()])
            assert abs(avg - ds["mean"][metric]) <= tol, (key, metric)


def test_paper_results_list_jaxnerf_with_its_source():
    jax = eval_table.load_paper()["reproductions"]["jaxnerf"]
    assert "jaxnerf/README.md" in jax["source"] and "PSNR only" in jax["note"]
    paper = eval_table.load_paper()["datasets"]
    for key, ds in jax["datasets"].items():
        assert set(ds["scenes"]) == set(paper[key]["scenes"])
        assert abs(np.mean([s["psnr"] for s in ds["scenes"].values()]) - ds["mean"]["psnr"]) <= 0.005
        assert all(set(s) == {"psnr"} for s in ds["scenes"].values())


def fake_metrics(folder, scene, dataset_type, W, H, n_views, psnr, ssim, lpips=None, step=500000):
    """A metrics.json as run_nerf writes it, without rendering (for table logic)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "format": scoring.FORMAT, "step": step, "scene": scene, "dataset_type": dataset_type,
        "H": H, "W": W, "n_views": n_views, "views": [],
        "mean": {"psnr": psnr, "ssim": ssim, "lpips": lpips},
        "lpips": {"available": lpips is not None, "net": "vgg", "reason": None if lpips else "offline"}}))


def test_results_table_marks_comparable_rows_and_averages_like_the_paper(tmp_path, capsys):
    fake_metrics(tmp_path / "lego_paper" / "testset_500000", "lego", "blender", 800, 800, 200, 32.0, 0.95, 0.06)
    fake_metrics(tmp_path / "ship_paper" / "testset_500000", "ship", "blender", 800, 800, 25, 29.0, 0.86, 0.2)
    fake_metrics(tmp_path / "fern_paper" / "testset_200000", "fern", "llff", 1008, 756, 3, 25.0, 0.8, 0.3)
    runs = [str(tmp_path / r) for r in ("lego_paper", "ship_paper", "fern_paper")]
    assert eval_table.main([*runs, "--means"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["lego_paper"][15] == "yes" and rows["fern_paper"][15] == "yes"
    assert rows["ship_paper"][15] == "no" and "ship_paper: 25 test views, the paper 200" in out
    paper = eval_table.load_paper()["datasets"]
    blender = [cells for cells in rows.values() if cells[0] == "mean blender" and "Synthetic" in cells[1]]
    assert len(blender) == 1 and blender[0][1].startswith("2 of 8")
    ref = (paper["blender"]["scenes"]["lego"]["psnr"] + paper["blender"]["scenes"]["ship"]["psnr"]) / 2
    assert blender[0][6] == "30.50" and float(blender[0][7]) == pytest.approx(ref, abs=0.005)
    assert blender[0][15] == "no"  # one of its rows is not comparable
    # All eight scenes: the paper's published mean is the reference.
    compared = [eval_table.compare(dict(eval_table.read_run(runs[0]), scene=s), eval_table.load_paper())
                for s in paper["blender"]["scenes"]]
    (mean,) = eval_table.mean_rows(compared, eval_table.load_paper())
    assert mean["paper_psnr"] == paper["blender"]["mean"]["psnr"] and mean["psnr"] == 32.0
    assert mean["delta_lpips"] == pytest.approx(0.06 - paper["blender"]["mean"]["lpips"])


def make_run(root, run, test_dir, scene, dataset_type, seed, noise):
    rng = np.random.default_rng(seed)
    gts = [random_image(rng) for _ in range(3)]
    renders = [np.clip(g + rng.normal(0, noise, g.shape), 0, 1) for g in gts]
    step = int(test_dir.rsplit("_", 1)[1])
    return scoring.write_metrics_json(
        root / run / test_dir, step, gts, renders, scene=scene, dataset_type=dataset_type,
        lpips_scorer=unavailable_lpips(root))


def table_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 16 and cells[0] not in ("Run",) \
                and not cells[0].startswith("---"):
            rows[cells[0]] = cells
    return rows


def test_results_table_lists_two_runs_beside_the_paper(tmp_path, capsys):
    logs = tmp_path / "logs"
    make_run(logs, "lego_test", "testset_000100", "lego", "blender", 20, 0.02)
    newest = make_run(logs, "lego_test", "testset_000200", "lego", "blender", 21, 0.01)
    fern = make_run(logs, "fern_test", "renderonly_test_000050", "fern", "llff", 22, 0.05)

    assert eval_table.main([str(logs / "lego_test"), str(logs / "fern_test")]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert set(rows) == {"lego_test", "fern_test"}
    paper = eval_table.load_paper()["datasets"]
    for run, m, ds, res in (("lego_test", newest, "blender", "800x800"),
                            ("fern_test", fern, "llff", "1008x756")):
        row = rows[run]
        ref = paper[ds]["scenes"][m["scene"]]
        assert row[1] == m["scene"] and row[2] == str(m["step"]) and row[3] == "3"
        assert row[4] == "32x24" and row[5] == res
        for col, key, digits in ((6, "psnr", 2), (9, "ssim", 3)):
            assert row[col] == f"{m['mean'][key]:.{digits}f}"
            assert float(row[col + 1]) == ref[key]
            assert row[col + 2] == f"{m['mean'][key] - ref[key]:+.{digits}f}"
        assert row[12] == "n/a" and float(row[13]) == ref["lpips"] and row[14] == "n/a"
        assert row[15] == "no"  # not the paper's resolution
    assert rows["lego_test"][2] == "200"  # the newest test set, not step 100
    assert "fern_test: scored at 32x24, the paper at 1008x756" in out
    assert "LPIPS unavailable:" in out and "lego_test" in out.split("LPIPS unavailable:")[0].splitlines()[-1]


def test_results_table_command_line(tmp_path):
    make_run(tmp_path, "lego_test", "testset_000300", "lego", "blender", 30, 0.02)
    done = subprocess.run([sys.executable, str(REPO / "eval_table.py"),
                           str(tmp_path / "lego_test")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| lego_test | lego | 300 |" in done.stdout


def test_results_table_rejects_bad_input(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert eval_table.main([str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}: ")

    empty = tmp_path / "empty_test"
    empty.mkdir()
    assert eval_table.main([str(empty)]) == 2
    assert "no testset_*/metrics.json" in capsys.readouterr().err

    broken = tmp_path / "broken_test" / "testset_000001"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{not json")
    assert eval_table.main([str(broken.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken / 'metrics.json'}: ") and "not valid JSON" in err

    partial = tmp_path / "partial_test" / "testset_000001"
    partial.mkdir(parents=True)
    (partial / "metrics.json").write_text(json.dumps({"step": 1, "H": 2, "W": 2}))
    assert eval_table.main([str(partial.parent)]) == 2
    assert "missing field 'scene'" in capsys.readouterr().err
