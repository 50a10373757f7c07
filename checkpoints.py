"""Checkpoint files: `{step:06d}.tar` under basedir/expname.

The four keys of the original (`global_step`, `network_fn_state_dict`,
`network_fine_state_dict`, `optimizer_state_dict`) plus what exact resumption
needs: the random generators' states and the ray batcher's position. Files
are written to a temporary name and renamed into place, and read with
`weights_only=True` (no pickled code runs).

Step counting: the original saves `global_step` = step - 1 (its `001000.tar`
holds 999) and resumes by repeating the saved step. This project saves the
number of completed steps and marks its files with `STEP_KEY`, so a resumed
run continues at the next step; the original's files are read accordingly.
"""
import logging
import os
import pickle
import re
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from errors import DataError
from outputs import atomic_path

STEP_KEY = "steps_completed"
log = logging.getLogger("nerf")


def list_checkpoints(expdir: Path) -> List[Path]:
    """The `*.tar` files of a run folder, sorted by name (oldest first); hidden
    ones (a save cut off by a crash, `.{step}.partial.tar`) are not checkpoints."""
    expdir = Path(expdir)
    if not expdir.is_dir():
        return []
    return [expdir / f for f in sorted(os.listdir(expdir)) if f.endswith(".tar") and not f.startswith(".")]


def read_checkpoint(path: Path, map_location=None) -> dict:
    """Loads one checkpoint safely; DataError names the file when it can't.
    Only tensors and plain containers are accepted (`weights_only=True`): a
    file that pickles any other object is refused, and none of it runs."""
    if not Path(path).is_file():
        raise DataError(path, "no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise DataError(path, f"cannot be loaded as a checkpoint (truncated or corrupt: {_first_line(exc)})") from None
        found = re.search(r"GLOBAL (\S+)", str(exc), re.IGNORECASE)
        culprit = f" ({found.group(1)})" if found else ""
        raise DataError(path, f"refused: it pickles a Python object{culprit}, not only tensors; loading it could "
                              f"run code (checkpoints are read with torch.load(weights_only=True))") from None
    except Exception as exc:
        raise DataError(path, f"cannot be loaded as a checkpoint (truncated or corrupt: {_first_line(exc)})") from None
    if not isinstance(ckpt, dict) or "network_fn_state_dict" not in ckpt or "global_step" not in ckpt:
        raise DataError(path, "is not a NeRF checkpoint (no network_fn_state_dict / global_step)")
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else exc.__class__.__name__


def steps_done(ckpt: dict) -> int:
    """How many training steps the checkpoint's weights have seen."""
    return int(ckpt["global_step"]) + (0 if ckpt.get(STEP_KEY) else 1)


def find_checkpoint(expdir: Path, ft_path: Optional[str], no_reload: bool, map_location=None):
    """The checkpoint to resume from: `ft_path` if given, else the newest
    loadable one in `expdir` (a corrupt newer file is skipped with a warning,
    never deleted), or None with `no_reload` or when there is none.
    Returns (path, ckpt) or (None, None)."""
    if ft_path:
        return Path(ft_path), read_checkpoint(Path(ft_path), map_location)
    if no_reload:
        return None, None
    candidates = list_checkpoints(expdir)
    for path in reversed(candidates):
        try:
            return path, read_checkpoint(path, map_location)
        except DataError as err:
            log.warning("warning: %s: %s; skipped (the file is kept), trying the previous checkpoint",
                        err.where, err.what)
    if candidates:
        log.warning("warning: %s: no readable checkpoint; starting from step 0", expdir)
    return None, None


def rng_state() -> dict:
    """The global torch, CUDA and NumPy generator states, as tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, step: int, network_fn, network_fine, optimizer, sampler_state: dict) -> None:
    """Writes `path` whole or not at all (outputs.atomic_path); WriteError
    when the OS refuses (a full disk, ...), any earlier file left as it was."""
    ckpt = {
        "global_step": step,
        STEP_KEY: True,
        "network_fn_state_dict": network_fn.state_dict(),
        "network_fine_state_dict": network_fine.state_dict() if network_fine is not None else None,
        "optimizer_state_dict": optimizer.state_dict(),
        "rng_state": rng_state(),
        "sampler_state": sampler_state,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)


def load_network_state(module: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming the layers that differ."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    def first(names, sep=", "):
        return sep.join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    problems = ([f"missing {first(missing)}"] if missing else []) + \
               ([f"unexpected {first(unexpected)}"] if unexpected else []) + \
               ([f"shapes (file vs network) {first(shapes, '; ')}"] if shapes else [])
    if problems:
        raise DataError(path, f"{what} does not match the network ({'; '.join(problems)})")
    module.load_state_dict(state, strict=True)
