"""Checks that run before any heavy work, so a typo costs seconds, not a run.

Every problem found is a `DataError(where, what)`, which the command line
prints as one line, `error: <file or flag>: <what is wrong>`, exiting with
status 2. In the order `run_nerf.train` calls them:

- `parse_args`: the command line and the config file (exists, every line is
  `key = value` with a known key and a value of the right type), then the
  numeric flags' ranges and `dataset_type`.
- `check_data`: the data folder, read from file headers only (no image is
  decoded): LLFF `poses_bounds.npy` (N x 17, finite, positive bounds, N equal
  to the image count), Blender/LINEMOD `transforms_*.json` (fields, 4x4
  matrices, every frame that will be read exists), images readable and of
  one size; and `--N_rand` against the pixels `--no_batching` draws from
  without replacement.
- `check_writable`: the folders the run will write to can be written or
  made (a base directory under a file, or under /proc, is refused).
- `check_outputs`: after the checkpoint is chosen and before anything is
  written, refuses a run that would overwrite an earlier run's work
  (`--no_reload`/`--ft_path` into a folder holding later checkpoints).

`keep_earlier` is the last guard when writing: an existing file or folder at
the target (an earlier `--render_only` render, or outputs left after falling
back from an unreadable newest checkpoint) is renamed aside, never
overwritten or deleted.
"""
import argparse
import difflib
import errno
import io
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import configargparse
import numpy as np
import torch
from PIL import Image

from checkpoints import list_checkpoints, read_checkpoint
from datasets import DATASET_TYPES
from errors import DataError
from load_blender import SPLITS, read_transforms
from load_llff import _select_registered, list_images
from outputs import reported
from run_nerf_helpers import default_device

log = logging.getLogger("nerf")

BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def parse_bool(value: str) -> bool:
    """A switch's value, `True`/`False` (or yes/no, on/off, 1/0, any case)."""
    word = str(value).lower()
    if word not in BOOLEAN_WORDS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(BOOLEAN_WORDS)}, got '{value}'")
    return BOOLEAN_WORDS.index(word) % 2 == 0


class Switch(argparse.Action):
    """An off-by-default flag that also takes a value: `--half_res` and
    `--half_res True` turn it on, `--half_res False` turns off what a config
    file turned on. Registered as `store_true` by `run_nerf.config_parser`."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, type=parse_bool,
                         required=required, help=help, metavar="True|False")

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


# (flag, test, what the value must be); checked in this order.
_AT_LEAST_1 = ("N_rand", "N_samples", "chunk", "netchunk", "factor", "netdepth", "netwidth", "netdepth_fine",
               "netwidth_fine", "lrate_decay", "i_print", "i_img", "i_weights", "i_testset", "i_video")
_AT_LEAST_0 = ("N_importance", "N_iters", "llffhold", "precrop_iters", "testskip", "render_factor", "multires",
               "multires_views")
_FLOATS_AT_LEAST_0 = ("lrate", "perturb", "raw_noise_std")


# --- Command line and config file -------------------------------------------

def parse_args(parser: configargparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """`parser.parse_args(argv)` where every mistake is a DataError instead of
    argparse's usage text: an unknown flag, a bad value, a missing or
    malformed config file, an unknown config key; then the flags' ranges."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.error = _raise_parse_error(parser)   # this instance only
    sources: Dict[str, str] = {}
    for path in _config_paths(parser, argv):
        sources.update(check_config_file(parser, path))
    args = parser.parse_args(argv)
    given = {_long_name(tok) for tok in argv if tok.startswith("--")}
    check_flags(args, {k: v for k, v in sources.items() if k not in given})
    return args


def _long_name(token: str) -> str:
    return token.split("=", 1)[0][2:]


def _option_names(parser) -> List[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _raise_parse_error(parser):
    def error(message: str):
        match = re.match(r"argument (\S+): (.*)", message, re.S)
        if match:
            raise DataError(match.group(1).split("/")[-1], match.group(2))
        match = re.match(r"unrecognized arguments: (.*)", message, re.S)
        if match:
            first = match.group(1).split()[0]
            if first.startswith("-"):
                flag = first.split("=", 1)[0]
                raise DataError(flag, "unknown flag" + _did_you_mean(flag, _option_names(parser)))
            raise DataError("command line", f"unexpected value '{first}' (a flag that takes no value?)")
        raise DataError("command line", message)
    return error


def _config_paths(parser, argv: List[str]) -> List[str]:
    """The config files named on the command line (`--config F` or `--config=F`)."""
    opts = [s for a in parser._actions if getattr(a, "is_config_file_arg", False) for s in a.option_strings]
    paths = []
    for k, tok in enumerate(argv):
        for opt in opts:
            if tok == opt and k + 1 < len(argv):
                paths.append(argv[k + 1])
            elif tok.startswith(opt + "="):
                paths.append(tok[len(opt) + 1:])
    return paths


def check_config_file(parser, path: str) -> Dict[str, str]:
    """Checks a `key = value` config file line by line, with the parser's own
    grammar: each key must be a flag's name and each value fit its type.
    Returns {flag name: "<file> line <n>"} for the keys it sets."""
    if not Path(path).is_file():
        raise DataError(path, "config file does not exist" if not Path(path).exists() else "config file is not a file")
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable config file ({exc.__class__.__name__})") from None
    known = {key: action for action in parser._actions for key in parser.get_possible_config_keys(action)}
    names = sorted({k for k in known if not k.startswith("-")})
    sources = {}
    for lineno, line in enumerate(lines, 1):
        try:
            items = parser._config_file_parser.parse(io.StringIO(line))
        except Exception:
            raise DataError(path, f"line {lineno}: cannot parse '{line.strip()}' (expected key = value)") from None
        for key, value in items.items():
            action = known.get(key)
            if action is None:
                raise DataError(path, f"line {lineno}: unknown key '{key}'{_did_you_mean(key, names)}")
            problem = _value_problem(action, value)
            if problem:
                raise DataError(path, f"line {lineno}: {key} = {value}: {problem}")
            sources[action.dest] = f"{path} line {lineno}"
    return sources


def _value_problem(action, value) -> Optional[str]:
    """Why configargparse would reject `value` for `action`, or None."""
    if isinstance(value, list):
        return None if action.nargs not in (None, "?") else "expected a single value, not a list"
    if isinstance(action, (Switch, *configargparse.ACTION_TYPES_THAT_DONT_NEED_A_VALUE)):
        return None if value.lower() in BOOLEAN_WORDS else f"expected one of {', '.join(BOOLEAN_WORDS)}"
    if action.type in (int, float):
        try:
            action.type(value)
        except ValueError:
            return "not an integer" if action.type is int else "not a number"
    if action.choices and value not in [str(c) for c in action.choices]:
        return f"expected one of {', '.join(map(str, action.choices))}"
    return None


def check_flags(args, sources: Optional[Dict[str, str]] = None) -> None:
    """Ranges of the numeric flags and the dataset type. A value taken from the
    config file says so, with its line."""
    sources = sources or {}

    def fail(name: str, what: str):
        where = f" (set in {sources[name]})" if name in sources else ""
        raise DataError(f"--{name}", what + where)

    def value(name):
        return getattr(args, name, None)

    if value("dataset_type") is not None and args.dataset_type not in DATASET_TYPES:
        fail("dataset_type", f"unknown '{args.dataset_type}' (one of {', '.join(DATASET_TYPES)})")
    for name in _AT_LEAST_1:
        if value(name) is not None and value(name) < 1:
            fail(name, f"must be at least 1, got {value(name)}")
    for name in _AT_LEAST_0:
        if value(name) is not None and value(name) < 0:
            fail(name, f"must be 0 or more, got {value(name)}")
    for name in _FLOATS_AT_LEAST_0:
        if value(name) is not None and not (math.isfinite(value(name)) and value(name) >= 0):
            fail(name, f"must be a finite number >= 0, got {value(name)}")
    frac = value("precrop_frac")
    if frac is not None and not (0 < frac <= 1):
        fail("precrop_frac", f"must be in (0, 1], got {frac}")
    if value("i_embed") is not None and args.i_embed not in (0, -1):
        fail("i_embed", f"must be 0 (positional encoding) or -1 (none), got {args.i_embed}")
    if value("dataset_type") == "deepvoxels" and value("testskip") == 0:
        fail("testskip", "must be at least 1 for deepvoxels")


def choose_device(flag: Optional[str], local_rank: int = 0, world_size: int = 1):
    """The training device: `--device` (cuda, cuda:1, mps, cpu), else CUDA,
    MPS or the CPU, whichever is present. Under torchrun, a CUDA device
    without an index is the process's LOCAL_RANK-th GPU (round robin when
    there are fewer GPUs than processes on the node)."""
    if flag is None:
        device = default_device()
    else:
        try:
            device = torch.device(flag)
        except RuntimeError:
            raise DataError("--device", f"unknown device '{flag}' (cuda, cuda:N, mps or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError("--device", f"{flag}: CUDA is not available on this machine (torch {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count if world_size > 1 else torch.cuda.current_device())
        if device.index >= count:
            raise DataError("--device", f"{flag}: this machine has {count} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DataError("--device", f"{flag}: Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DataError("--device", f"unsupported device type '{device.type}' (cuda, cuda:N, mps or cpu)")
    if world_size > 1 and device.type == "mps":
        raise DataError("--device", "mps: torch.distributed has no backend for Apple MPS; data-parallel runs "
                                    "use CUDA (NCCL) or the CPU (gloo): add --device cpu, or run one process")
    return device


def check_same_start(starts: Sequence[int], expdir: Path) -> None:
    """Every process of a data-parallel run found the same checkpoint step."""
    if len(set(starts)) > 1:
        raise DataError(expdir, f"the processes found different checkpoints to resume from (steps {sorted(set(starts))} "
                                f"in rank order {list(starts)}): every machine must see the same --basedir "
                                f"(a shared file system) or --ft_path")


def check_world_size(args, world_size: int) -> None:
    """Each of the world_size processes renders N_rand / world_size rays a step."""
    if world_size > 1 and args.N_rand % world_size:
        raise DataError("--N_rand", f"{args.N_rand} rays per step do not split evenly over {world_size} processes; "
                                    f"use a multiple of {world_size}")


# --- Data folder ---------------------------------------------------------------

def check_data(args) -> Optional[Tuple[int, int]]:
    """Checks the scene that `args` names without decoding any image; returns
    the training images' (H, W) as the loader will give them. The demo scene
    is made first if it is not there yet."""
    datadir = Path(args.datadir)
    if args.dataset_type == "demo":
        from demo_scene import ensure_demo_scene
        ensure_demo_scene(datadir)
    if not datadir.is_dir():
        raise DataError(datadir, "data folder does not exist" + how_to_get(datadir)
                        if not datadir.exists() else "is not a folder")
    if args.dataset_type == "llff":
        H, W = _check_llff(datadir, args.factor, args.llffhold, needs_training=not args.render_only)
    elif args.dataset_type in ("blender", "demo", "LINEMOD"):
        H, W = _check_transforms(datadir, args.testskip, args.half_res, linemod=args.dataset_type == "LINEMOD")
    else:
        H, W = _check_deepvoxels(datadir, args.shape, args.testskip)
    if args.no_batching and not args.render_only:
        _check_ray_count(args, H, W)
    return H, W


EXAMPLE_SCENES = ("fern", "lego")      # what download_example_data.sh fetches
RELEASED_SCENES = {"nerf_llff_data": ("fern", "flower", "fortress", "horns", "leaves", "orchids", "room", "trex"),
                   "nerf_synthetic": ("chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship")}


def how_to_get(datadir: Path) -> str:
    """Where a missing scene of the shipped configs comes from, as a clause
    to append to the error ("" for other folders)."""
    release, scene = Path(datadir).parent.name, Path(datadir).name
    if scene not in RELEASED_SCENES.get(release, ()):
        return ""
    if scene in EXAMPLE_SCENES:
        return "; run `bash download_example_data.sh` to fetch it (the example scenes fern and lego)"
    return (f"; {scene} is in {release}.zip of the NeRF authors' data release (see README): unzip it into "
            f"{Path(datadir).parent.parent}")


def image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the header; the file's structure is verified
    (a truncated PNG fails) but no pixel is decoded."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = text.replace(str(path), "").replace("''", "").strip(" :")
        raise DataError(path, f"unreadable image ({exc.__class__.__name__}{': ' + text if text else ''})") from None
    return size


def _same_size(files: Sequence[Path]) -> Tuple[int, int]:
    """All files' (width, height), which must agree; returns it."""
    first = None
    for f in files:
        size = image_size(f)
        if first is None:
            first = size
        elif size != first:
            raise DataError(f, f"is {size[0]}x{size[1]}, the first image is {first[0]}x{first[1]}")
    return first


def _check_llff(datadir: Path, factor: int, llffhold: int, needs_training: bool) -> Tuple[int, int]:
    poses_file = datadir / "poses_bounds.npy"
    if not poses_file.is_file():
        raise DataError(poses_file, "missing")
    try:
        arr = np.load(poses_file, allow_pickle=False)
    except Exception as exc:
        raise DataError(poses_file, f"not a readable .npy array ({exc.__class__.__name__})") from None
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise DataError(poses_file, f"has shape {arr.shape}, expected N x 17")
    if arr.shape[0] == 0:
        raise DataError(poses_file, "has no rows (no cameras)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(poses_file, f"holds {arr.dtype} values, expected real numbers")
    if not np.isfinite(arr).all():
        raise DataError(poses_file, f"row {int(np.argwhere(~np.isfinite(arr))[0, 0])} holds NaN or inf")
    if (arr[:, -2:] <= 0).any():
        raise DataError(poses_file, f"row {int(np.argwhere(arr[:, -2:] <= 0)[0, 0])} has a depth bound <= 0")

    imgdir = datadir / f"images_{factor}" if factor != 1 else datadir / "images"
    scale = 1
    if not imgdir.is_dir() and factor != 1:
        # the loader makes images_<factor>/ from images/
        imgdir, scale = datadir / "images", factor
        if not imgdir.is_dir():
            raise DataError(imgdir, f"missing (needed to make images_{factor}/)")
    if not imgdir.is_dir():
        raise DataError(imgdir, "missing")
    files = _select_registered(datadir, list_images(imgdir))
    if len(files) != arr.shape[0]:
        raise DataError(poses_file, f"has {arr.shape[0]} poses but {imgdir} has {len(files)} images")
    w, h = _same_size(files)
    if scale != 1:
        w, h = max(1, round(w / scale)), max(1, round(h / scale))
    n = arr.shape[0]
    held_out = len(range(0, n, llffhold)) if llffhold > 0 else 1
    if needs_training and held_out >= n:
        raise DataError("--llffhold", f"{llffhold} holds out all {n} images as test views; none is left to train on")
    return h, w


def _check_transforms(datadir: Path, testskip: int, half_res: bool, linemod: bool) -> Tuple[int, int]:
    files = []
    metas = {}
    for split in SPLITS:
        meta = read_transforms(datadir, split)
        metas[split] = meta
        name = f"transforms_{split}.json"
        if not linemod:
            angle = meta.get("camera_angle_x")
            if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 < angle < math.pi:
                raise DataError(datadir / name, "has no 'camera_angle_x' (a number in (0, pi))"
                                if angle is None else f"'camera_angle_x' is {angle!r}, expected a number in (0, pi)")
        for k, frame in enumerate(meta["frames"]):
            if not isinstance(frame["file_path"], str):
                raise DataError(datadir / name, f"frame {k}: 'file_path' is not a string")
            try:
                matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
            except (TypeError, ValueError):
                matrix = None
            if matrix is None or not np.isfinite(matrix).all():
                raise DataError(datadir / name, f"frame {k}: 'transform_matrix' holds a value that is not a number")
        skip = 1 if split == "train" or testskip == 0 else testskip
        for frame in meta["frames"][::skip]:
            path = datadir / (frame["file_path"] + ("" if linemod else ".png"))
            if not path.is_file():
                raise DataError(path, f"missing (referenced by {name})")
            files.append(path)
    if linemod:
        for split in ("train", "test"):
            for key in ("near", "far"):
                if not isinstance(metas[split].get(key), (int, float)):
                    raise DataError(datadir / f"transforms_{split}.json", f"has no numeric '{key}'")
        if np.shape(metas["test"]["frames"][0].get("intrinsic_matrix")) not in ((3, 3), (4, 4)):
            raise DataError(datadir / "transforms_test.json", "frame 0 has no 3x3 or 4x4 'intrinsic_matrix'")
    w, h = _same_size(files)
    return (h // 2, w // 2) if half_res else (h, w)


def _check_deepvoxels(datadir: Path, shape: str, testskip: int) -> Tuple[int, int]:
    intrinsics = datadir / "train" / shape / "intrinsics.txt"
    if not intrinsics.is_file():
        raise DataError(intrinsics, "missing")
    for split in ("train", "validation", "test"):
        folder = datadir / split / shape
        counts = {}
        for sub, ext in (("rgb", ".png"), ("pose", ".txt")):
            if not (folder / sub).is_dir():
                raise DataError(folder / sub, "missing")
            counts[sub] = len([f for f in os.listdir(folder / sub) if f.endswith(ext)])
        if counts["rgb"] != counts["pose"] or counts["rgb"] == 0:
            raise DataError(folder, f"has {counts['rgb']} images in rgb/ and {counts['pose']} poses in pose/")
    return 512, 512


def _check_ray_count(args, H: int, W: int) -> None:
    """--no_batching draws N_rand pixels of one image without replacement, from
    the centre crop during the first precrop_iters steps."""
    if args.precrop_iters > 0:
        ch, cw = 2 * int(H // 2 * args.precrop_frac), 2 * int(W // 2 * args.precrop_frac)
        if ch * cw == 0:
            raise DataError("--precrop_frac", f"{args.precrop_frac} leaves an empty centre crop of the {W}x{H} images")
        if args.N_rand > ch * cw:
            raise DataError("--N_rand", f"{args.N_rand} rays per step, but --no_batching draws without replacement "
                                        f"from the {cw}x{ch} = {ch * cw} pixels of the centre crop "
                                        f"(--precrop_frac {args.precrop_frac}, first {args.precrop_iters} steps)")
    if args.N_rand > H * W:
        raise DataError("--N_rand", f"{args.N_rand} rays per step, but --no_batching draws without replacement "
                                    f"from the {W}x{H} = {H * W} pixels of one image")


# --- Outputs -------------------------------------------------------------------

def check_writable(args) -> None:
    """The folders the run writes to, basedir/expname and (when training)
    basedir/summaries/expname, exist and can be written to, or can be made:
    their nearest existing folder is writable and takes a new folder (made
    and removed at once). Nothing is left behind, and every data-parallel
    rank may check at the same time."""
    expdir = Path(args.basedir) / str(args.expname)
    folders = [expdir] if args.render_only else [expdir, Path(args.basedir) / "summaries" / str(args.expname)]
    for folder in folders:
        parts = [folder, *folder.parents]
        existing = next(part for part in parts if part.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
            if not os.access(existing, os.W_OK | os.X_OK):
                code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
                raise PermissionError(code, os.strerror(code), str(existing))
            if existing != folder:
                try:
                    os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
                except OSError as exc:   # e.g. under /proc
                    raise OSError(exc.errno, exc.strerror, str(parts[parts.index(existing) - 1])) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename and Path(exc.filename) != folder else ""
            raise DataError(folder, f"cannot be made or written (--basedir): {where}{exc.strerror}") from None


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a `{step:06d}.tar` name, else None."""
    stem = Path(path).name[:-len(".tar")] if Path(path).name.endswith(".tar") else ""
    return int(stem) if stem.isdigit() else None


def render_only_dir(expdir: Path, render_test: bool, step: int) -> Path:
    return Path(expdir) / f"renderonly_{'test' if render_test else 'path'}_{step:06d}"


def check_outputs(args, expdir: Path, ckpt_path: Optional[Path], ckpt: Optional[dict], start: int) -> None:
    """Refuses, before anything is written, a run that would overwrite an
    earlier run's checkpoints or renders."""
    expdir = Path(expdir)
    if args.render_only:
        return   # an earlier render in the same folder is kept aside (keep_earlier)
    if not (args.no_reload or args.ft_path):
        return   # resuming: newer checkpoints, if any, were unreadable and get set aside when reached
    own = Path(ckpt_path).resolve() if ckpt_path is not None else None
    later = [p for p in list_checkpoints(expdir)
             if (checkpoint_step(p) or 0) > start and p.resolve() != own]
    if later:
        flag = "--ft_path" if args.ft_path else "--no_reload"
        raise DataError(expdir, f"holds checkpoints of an earlier run up to {later[-1].name}; {flag} starts at step "
                                f"{start} and would overwrite them: use another --expname or move them away")


def keep_earlier(path: Path) -> Path:
    """Makes room for a new output at `path` without losing an existing one:
    a file or folder already there is renamed to `<name>.earlier` (or
    `<name>.corrupt` for an unreadable checkpoint; then `...2`, `...3`), with a
    warning. Returns `path`; WriteError if the rename is refused."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    tag = "earlier"
    if path.name.endswith(".tar") and path.is_file():
        try:
            read_checkpoint(path)
        except DataError:
            tag = "corrupt"
    aside = path.with_name(f"{path.name}.{tag}")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.{tag}{n}")
    with reported(path):
        os.rename(path, aside)
    log.warning("warning: %s: already existed; kept it as %s", path, aside.name)
    return path


def nonfinite_message(step: int, last_checkpoint: Optional[Path]) -> str:
    newest = f"the newest checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    return (f"error: step {step}: loss is not finite (NaN or inf); training stopped and saved nothing from this "
            f"step on; {newest}")
