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
import zipfile
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
    it can't, with what is wrong in a sentence (`unreadable_reason`). Only
    tensors and plain containers are accepted (`weights_only=True`): a file
    that pickles any other object is refused, and none of it runs. The keys
    the networks are rebuilt from must hold what they should."""
    if not Path(path).is_file():
        raise DataError(path, "no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(path, unreadable_reason(Path(path), exc)) from None
    if not isinstance(ckpt, dict) or "network_fn_state_dict" not in ckpt or "global_step" not in ckpt:
        raise DataError(path, "is not a NeRF checkpoint (no network_fn_state_dict / global_step)")
    problem = _content_problem(ckpt)
    if problem:
        raise DataError(path, f"is not a usable NeRF checkpoint: {problem}")
    return ckpt


ZIP_HEADER = b"PK\x03\x04"      # torch.save's format since PyTorch 1.6
PICKLE_HEADER = b"\x80"          # the legacy format: a pickle stream


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why torch.load(weights_only=True) failed on `path`, as one sentence:
    refused (it pickles code), empty, cut short, a damaged archive, or not a
    PyTorch file at all (judged from the file's first bytes and its zip
    directory, not from torch's wording)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and re.search(r"global", text, re.IGNORECASE):
        found = re.search(r"GLOBAL (\S+)", text, re.IGNORECASE)
        culprit = f" ({found.group(1)})" if found else ""
        return (f"refused: it pickles a Python object{culprit}, not only tensors; loading it could run code "
                f"(checkpoints are read with torch.load(weights_only=True))")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(ZIP_HEADER))
    if size == 0:
        return "is empty (0 bytes): not a checkpoint"
    if head == ZIP_HEADER or ZIP_HEADER.startswith(head):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return f"is cut short ({size} bytes, its zip archive has no end): the save or copy did not finish"
        missing = re.search(r"failed locating file (\S+?):", text)
        what = f"lacks {missing.group(1)}" if missing else f"cannot be unpacked ({exc.__class__.__name__})"
        return f"is a damaged checkpoint archive (it {what})"
    if not head.startswith(PICKLE_HEADER):
        return f"is not a PyTorch checkpoint ({size} bytes that begin with neither a zip nor a pickle header)"
    return f"is a damaged or cut short checkpoint ({size} bytes in the legacy pickle format, {exc.__class__.__name__})"


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _content_problem(ckpt: dict) -> Optional[str]:
    """What is wrong with the values a checkpoint's networks and step are
    rebuilt from, or None."""
    step = ckpt["global_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < -1:
        return f"'global_step' is {step!r}, not a step number"
    if not _is_state_dict(ckpt["network_fn_state_dict"]):
        return "'network_fn_state_dict' is not a dict of named tensors"
    if ckpt.get("network_fine_state_dict") is not None and not _is_state_dict(ckpt["network_fine_state_dict"]):
        return "'network_fine_state_dict' is not a dict of named tensors"
    if "optimizer_state_dict" not in ckpt:
        return "it has no 'optimizer_state_dict'"
    if not isinstance(ckpt["optimizer_state_dict"], dict):
        return "'optimizer_state_dict' is not a dict"
    return None


def steps_done(ckpt: dict) -> int:
    """How many training steps the checkpoint's weights have seen."""
    return int(ckpt["global_step"]) + (0 if ckpt.get(STEP_KEY) else 1)


def find_checkpoint(expdir: Path, ft_path: Optional[str], no_reload: bool):
    """The checkpoint to resume from: `ft_path` if given, else the newest
    loadable one in `expdir` (a corrupt newer file is skipped with a one-line
    warning, never deleted), or None with `no_reload` or when there is none.
    Returns (path, ckpt) or (None, None)."""
    if ft_path:
        return Path(ft_path), read_checkpoint(Path(ft_path))
    if no_reload:
        return None, None
    candidates = list_checkpoints(expdir)
    for k in reversed(range(len(candidates))):
        try:
            return candidates[k], read_checkpoint(candidates[k])
        except DataError as err:
            then = f"trying the one before, {candidates[k - 1].name}" if k else "no earlier checkpoint to fall back on"
            log.warning("warning: %s: %s; skipped and kept as it is (move it away, or name a good checkpoint with "
                        "--ft_path); %s", err.where, err.what, then)
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


# The flags that shape the networks a checkpoint holds.
NETWORK_FLAGS = ("netdepth", "netwidth", "netdepth_fine", "netwidth_fine", "N_importance", "use_viewdirs",
                 "i_embed", "multires", "multires_views")


def recorded_flags(args_txt: Path) -> dict:
    """{flag: value as written} of a run's args.txt (`name = value` lines); {} when unreadable."""
    try:
        lines = Path(args_txt).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines
                if "=" in line and not line.startswith("#"))


def explain_mismatch(err: DataError, ckpt_path: Path, args) -> DataError:
    """The error for a checkpoint whose networks do not fit this run's flags:
    where the args.txt beside it recorded other network flags, one line naming
    them and how to reuse them (`--config <that args.txt>`); else `err`."""
    args_txt = Path(ckpt_path).parent / "args.txt"
    recorded = recorded_flags(args_txt)
    differ = [flag for flag in NETWORK_FLAGS if flag in recorded and recorded[flag] != str(getattr(args, flag))]
    if not differ:
        return err
    theirs = " ".join(f"--{flag} {recorded[flag]}" for flag in differ)
    ours = " ".join(f"--{flag} {getattr(args, flag)}" for flag in differ)
    return DataError(ckpt_path, f"was trained with {theirs} (its run's {args_txt}), not {ours}: add those flags, "
                                f"or take all the run's flags with --config {args_txt}")
