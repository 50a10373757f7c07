"""The run folder before anything is written: writable, and no earlier run's checkpoints or renders overwritten.

- `check_writable`: the folders the run will write to can be written or
  made (a base directory under a file, or under /proc, is refused).
- `check_outputs`: after the checkpoint is chosen and before anything is
  written, refuses a run that would overwrite an earlier run's work
  (`--no_reload`/`--ft_path` into a folder holding later checkpoints).
- `check_same_start`: every process of a data-parallel run resumes from the
  same step.

`keep_earlier` is the last guard when writing: an existing file or folder at
the target (an earlier `--render_only` render, or outputs left after falling
back from an unreadable newest checkpoint) is renamed aside, never
overwritten or deleted.
"""
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from nerf.checkpoints import list_checkpoints, read_checkpoint
from nerf.errors import DataError
from nerf.outputs import reported

log = logging.getLogger("nerf")


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


def prune_checkpoints(expdir: Path, keep: int, saved_step: int) -> None:
    """Deletes all but the newest `keep` `{step:06d}.tar` files of `expdir` up to
    `saved_step`, the checkpoint just saved (`--keep_checkpoints`; 0 keeps all).
    Called after that save succeeded, so the newest good checkpoint is never
    among them; files of later steps (an unreadable one that resuming skipped)
    and other files (`.earlier`, `.corrupt`, renamed ones) are left alone. A
    file that cannot be deleted is one warning."""
    if keep <= 0:
        return
    steps = sorted((checkpoint_step(p), p) for p in list_checkpoints(expdir)
                   if checkpoint_step(p) is not None and checkpoint_step(p) <= saved_step)
    for _, path in steps[:-keep]:
        try:
            path.unlink()
        except OSError as exc:
            log.warning("warning: %s: %s; --keep_checkpoints could not delete it", path, exc.strerror or exc)


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


def check_same_start(starts: Sequence[int], expdir: Path) -> None:
    """Every process of a data-parallel run found the same checkpoint step."""
    if len(set(starts)) > 1:
        raise DataError(expdir, f"the processes found different checkpoints to resume from (steps {sorted(set(starts))} "
                                f"in rank order {list(starts)}): every machine must see the same --basedir "
                                f"(a shared file system) or --ft_path")
