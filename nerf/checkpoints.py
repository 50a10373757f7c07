"""Checkpoint files: `{step:06d}.tar` under basedir/expname.

The four keys of the original (`global_step`, `network_fn_state_dict`,
`network_fine_state_dict`, `optimizer_state_dict`) plus what exact resumption
needs: the random generators' states, the ray batcher's position and the
collapse guard's state (`collapse_guard`, nerf/collapse.py; absent in older
files and with `--collapse_guard off`). Files
are written to a temporary name and renamed into place, and read with
`weights_only=True` (no pickled code runs) onto the CPU, whatever device
wrote them: the caller moves parameters and optimizer state to its own
training device (`load_state_dict` does), and generator states are CPU
tensors by nature.

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

from nerf.errors import DataError
from nerf.outputs import atomic_path

STEP_KEY = "steps_completed"
log = logging.getLogger("nerf")


def list_checkpoints(expdir: Path) -> List[Path]:
    """The `*.tar` files of a run folder, sorted by name (oldest first); hidden
    ones (a save cut off by a crash, `.{step}.partial.tar`) are not checkpoints."""
    expdir = Path(expdir)
    if not expdir.is_dir():
        return []
    return [expdir / f for f in sorted(os.listdir(expdir)) if f.endswith(".tar") and not f.startswith(".")]


def read_checkpoint(path: Path) -> dict:
    """Loads one checkpoint safely onto the CPU; DataError names the file when
    it can't. Only tensors and plain containers are accepted
    (`weights_only=True`): a file that pickles any other object is refused,
    and none of it runs."""
    if not Path(path).is_file():
        raise DataError(path, "no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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


def find_checkpoint(expdir: Path, ft_path: Optional[str], no_reload: bool):
    """The checkpoint to resume from: `ft_path` if given, else the newest
    loadable one in `expdir` (a corrupt newer file is skipped with a warning,
    never deleted), or None with `no_reload` or when there is none.
    Returns (path, ckpt) or (None, None)."""
    if ft_path:
        return Path(ft_path), read_checkpoint(Path(ft_path))
    if no_reload:
        return None, None
    candidates = list_checkpoints(expdir)
    for path in reversed(candidates):
        try:
            return path, read_checkpoint(path)
        except DataError as err:
            log.warning("warning: %s: %s; skipped (the file is kept), trying the previous checkpoint",
                        err.where, err.what)
    if candidates:
        log.warning("warning: %s: no readable checkpoint; starting from step 0", expdir)
    return None, None


def _device_generator(device: Optional[torch.device]):
    """(get_state, set_state) of the default generator of a CUDA or MPS
    device, which draws the sampling noise of a run there; None on the CPU
    (torch's global generator covers it)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (lambda: torch.cuda.get_rng_state(index)), (lambda s: torch.cuda.set_rng_state(s, index))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


def rng_state(device: Optional[torch.device] = None) -> dict:
    """The global torch and NumPy generator states, and the training device's
    generator state on CUDA or MPS, all as CPU tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached)}
    generator = _device_generator(device)
    if generator is not None:
        state["device_type"] = torch.device(device).type
        state["device_rng"] = generator[0]().cpu()
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> bool:
    """Restores `rng_state(device)`'s generators. Returns False when the
    state's device generator belongs to another kind of device than `device`
    (a run moved between CPU, CUDA and MPS), which is then left as seeded."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    generator = _device_generator(device)
    saved_type = state.get("device_type", "cuda" if "cuda" in state else "cpu")
    if generator is None or saved_type != torch.device(device).type:
        return generator is None and saved_type == "cpu"
    saved = state["device_rng"] if "device_rng" in state else state["cuda"][0]   # older files: every CUDA device's
    generator[1](saved.cpu())
    return True


def save_checkpoint(path: Path, step: int, network_fn, network_fine, optimizer, sampler_state: dict,
                    rng_states: List[dict], extra: Optional[dict] = None) -> None:
    """Writes `path` whole or not at all (outputs.atomic_path); WriteError
    when the OS refuses (a full disk, ...), any earlier file left as it was.

    `rng_states` holds every process's `rng_state` (one for a single-process
    run): `rng_state` is the first, as in single-process files, `rng_states`
    all of them, and `world_size` their number. `extra` adds keys of other
    modules' states (`collapse_guard`: nerf/collapse.py)."""
    ckpt = {
        "global_step": step,
        STEP_KEY: True,
        "network_fn_state_dict": network_fn.state_dict(),
        "network_fine_state_dict": network_fine.state_dict() if network_fine is not None else None,
        "optimizer_state_dict": optimizer.state_dict(),
        "rng_state": rng_states[0],
        "rng_states": rng_states,
        "world_size": len(rng_states),
        "sampler_state": sampler_state,
        **(extra or {}),
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
