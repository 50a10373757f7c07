"""LPIPS (VGG) for the test-set scores: the ``lpips`` package, its VGG16 weights fetched once, and the scorer.

LPIPS needs the ``lpips`` package, torchvision, and the ImageNet VGG16 weights
in the torch hub cache. The weights are fetched once into that cache on first
use, as torchvision's model zoo would, saying so in one line, unless
downloads are off (``--no_download``, ``$NERF_NO_DOWNLOAD``). When anything
is missing, the scorer says LPIPS is unavailable and why; no value is made up.
Images are fed to the network in [-1, 1] (``lpips`` package, ``net='vgg'``).
Building and running the network leaves the training's random generators as
they were (its layers initialise from torch's global generator): a run
resumed from a test-set step's checkpoint goes on as the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nerf.metrics import as_float, check_same_shape

# Set (to anything but "" or "0") to keep LPIPS from fetching its VGG16 weights.
NO_DOWNLOAD_ENV = "NERF_NO_DOWNLOAD"
log = logging.getLogger("nerf")


@contextlib.contextmanager
def _downloads_blocked() -> Iterator[None]:
    """Make any torch.hub download raise while the block runs."""
    import torch.hub

    saved = torch.hub.download_url_to_file

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"refusing to download {url}: building the LPIPS model never downloads")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = saved


@contextlib.contextmanager
def _generators_untouched() -> Iterator[None]:
    """Restores torch's global (CPU) generator and NumPy's when the block ends,
    whatever it drew. The network is built on the CPU; its VGG forward pass
    draws nothing on any device."""
    import torch

    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _hub_dir(path: str | None) -> Iterator[None]:
    import torch.hub

    if path is None:
        yield
        return
    saved = torch.hub.get_dir()
    torch.hub.set_dir(path)
    try:
        yield
    finally:
        torch.hub.set_dir(saved)


def downloads_allowed(no_download: bool = False) -> bool:
    """False with ``--no_download`` or when ``$NERF_NO_DOWNLOAD`` is set (not "" or "0")."""
    return not no_download and os.environ.get(NO_DOWNLOAD_ENV, "") in ("", "0")


def vgg16_weights_url() -> str:
    """Where torchvision gets the ImageNet VGG16 weights (``VGG16_Weights.IMAGENET1K_V1``).

    Imports ``torchvision.models``; raises whatever that import raises.
    """
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.url


def fetch_vgg16_weights(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` the way torchvision's model zoo does.

    ``torch.hub.download_url_to_file`` writes to a temporary file, checks the
    SHA-256 prefix that the file name carries (``vgg16-397923af.pth``) and
    renames it into place, so an interrupted fetch leaves no partial file.
    """
    import torch.hub

    log.info("LPIPS: fetching the VGG16 ImageNet weights %s into %s (once)", url, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = torch.hub.HASH_REGEX.search(dest.name)
    torch.hub.download_url_to_file(url, str(dest), digest.group(1) if digest else None, progress=True)


class LPIPSScorer:
    """LPIPS (``lpips`` package, VGG) loaded lazily.

    ``scorer.available`` says whether it can score and ``scorer.reason`` why
    not (``None`` when it can). Calling it on two ``(H, W, 3)`` images in
    [0, 1] (or uint8) returns the LPIPS distance as a float, or ``None`` when
    unavailable. The model is built once, on first use.

    ``hub_dir`` is the torch hub cache holding the VGG16 ImageNet weights
    (``<hub_dir>/checkpoints/``); default ``torch.hub.get_dir()``, i.e.
    ``$TORCH_HOME/hub``. When the file is missing it is fetched once from
    torchvision's URL (:func:`fetch_vgg16_weights`) unless ``download`` is
    False (default: :func:`downloads_allowed`); building the model itself
    never downloads anything.
    """

    def __init__(self, net: str = "vgg", device: str | None = None,
                 hub_dir: str | os.PathLike | None = None, download: bool | None = None) -> None:
        self.net_name = net
        self.device = device
        self.hub_dir = None if hub_dir is None else str(hub_dir)
        self.download = downloads_allowed() if download is None else download
        self._model: Any = None
        self._reason: str | None = None
        self._checked = False

    # Only looks at files: imports nothing heavy, touches no network.
    def _missing_package(self) -> str | None:
        lpips_spec = importlib.util.find_spec("lpips")
        if lpips_spec is None:
            return "the lpips package is not installed (pip install -r requirements.txt)"
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed (lpips needs it for VGG16)"
        locations = list(lpips_spec.submodule_search_locations or [])
        linear = [Path(p) / "weights" / "v0.1" / f"{self.net_name}.pth" for p in locations]
        if not any(p.is_file() for p in linear):
            return f"the lpips package has no linear-layer weights for net='{self.net_name}'"
        return None

    def _missing_vgg16(self) -> str | None:
        """Finds (or fetches) the VGG16 weights in the hub cache; the reason when it can't."""
        import torch
        import torch.hub

        try:
            url = vgg16_weights_url()
        except Exception as exc:
            return (f"torchvision cannot be imported ({type(exc).__name__}: {exc}); it must be the "
                    f"build made for the installed torch {torch.__version__}")
        hub = self.hub_dir if self.hub_dir is not None else torch.hub.get_dir()
        weights = Path(hub) / "checkpoints" / os.path.basename(url)
        if weights.is_file():
            return None
        if not self.download:
            return (f"VGG16 ImageNet weights not found at {weights} and downloads are off "
                    f"(--no_download or ${NO_DOWNLOAD_ENV}); put {url} there to enable LPIPS")
        try:
            fetch_vgg16_weights(url, weights)
        except Exception as exc:
            return (f"could not fetch the VGG16 ImageNet weights {url} into {weights} "
                    f"({type(exc).__name__}: {exc}); offline? put the file there by hand")
        return None

    def _load(self) -> None:
        self._checked = True
        self._reason = self._missing_package()
        if self._reason is None and self.net_name == "vgg":
            self._reason = self._missing_vgg16()
        if self._reason is not None:
            return
        try:
            import torch

            lpips = importlib.import_module("lpips")
            with _hub_dir(self.hub_dir), _downloads_blocked(), _generators_untouched():
                model = lpips.LPIPS(net=self.net_name, verbose=False)
            if self.device is None:
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self._model = model.to(self.device).eval()
        except Exception as exc:  # report, never crash the training loop
            self._reason = f"loading lpips failed: {type(exc).__name__}: {exc}"
            self._model = None

    @property
    def available(self) -> bool:
        if not self._checked:
            self._load()
        return self._model is not None

    @property
    def reason(self) -> str | None:
        """Why LPIPS is unavailable, or None when it is available."""
        if not self._checked:
            self._load()
        return self._reason

    def __call__(self, img: np.ndarray, ref: np.ndarray) -> float | None:
        if not self.available:
            return None
        import torch

        a, b = as_float(img), as_float(ref)
        check_same_shape(a, b)

        def to_tensor(x: np.ndarray) -> "torch.Tensor":
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            return (t.permute(2, 0, 1)[None] * 2.0 - 1.0).to(self.device)

        with torch.no_grad(), _generators_untouched():
            dist = self._model(to_tensor(a), to_tensor(b))
        return float(dist.reshape(-1)[0])


_DEFAULT_LPIPS: dict[bool, LPIPSScorer] = {}


def default_lpips_scorer(download: bool | None = None) -> LPIPSScorer:
    """One shared VGG LPIPS scorer per process and download setting (built on
    first use); ``download`` defaults to :func:`downloads_allowed`."""
    download = downloads_allowed() if download is None else download
    if download not in _DEFAULT_LPIPS:
        _DEFAULT_LPIPS[download] = LPIPSScorer(download=download)
    return _DEFAULT_LPIPS[download]
