"""Writing a run's files so that a fault costs one line, never a traceback or a broken file.

Every file a run writes (checkpoints, args.txt, config.txt, metrics.json,
videos, and render folders as a whole) goes through `atomic_path`: it is
written under a temporary name beside its target, `.{stem}.partial{suffix}`
(hidden, and keeping the extension the writer picks its format from), flushed
to disk and renamed into place. The target is therefore either complete or
absent (or the earlier file, untouched). When the operating system refuses (a full disk, a quota or
file-size limit, a read-only or vanished folder), the temporary file is
removed and the OSError becomes `WriteError(path, reason)` (so does the
RuntimeError that torch.save's zip writer raises after a failed write, whose
context is that OSError: `failed_write`); the caller turns it
into one line: a warning where the run can go on (`warn_on_write_error`),
`error: <path>: <reason>` and exit status 1 where it cannot.

TensorBoard's events file is appended to by a background thread and cannot be
replaced whole: `EventLog` stops logging at its first failed write, with one
warning, and the events written before stay readable.
"""
import errno
import io
import logging
import os
import resource
import shutil
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional, Union

import imageio.v2 as imageio
import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np

from nerf.errors import WriteError

log = logging.getLogger("nerf")
PathLike = Union[str, os.PathLike]


def partial_path(path: PathLike) -> Path:
    """The temporary name `atomic_path` writes `path` under: `.{stem}.partial{suffix}`."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def failed_write(exc: BaseException) -> Optional[OSError]:
    """The OSError that `exc` is, or that it was raised while handling: torch.save
    into a file object turns a write that failed (EFBIG, ENOSPC) into
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`
    from its `__exit__`, with the OSError as its `__context__`. None for any
    other error (a RuntimeError of anything but a write is not a write fault)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        if not isinstance(exc, RuntimeError):
            return None
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def reported(path: PathLike) -> Iterator[None]:
    """Turns a failed write raised inside (`failed_write`: an OSError, or a
    RuntimeError raised because of one) into `WriteError(path, the operating
    system's reason)`; any other exception passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        cause = failed_write(exc)
        if cause is None:
            raise
        raise WriteError(path, cause.strerror or str(cause) or cause.__class__.__name__) from None


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields the temporary name to write the file (or make and fill the
    folder) `path` under; when the block ends without an error, it is fsynced
    and renamed to `path` (a file replacing an earlier one), and the rename
    made durable. On any error the temporary file or folder is removed (never
    `path`) and an OSError becomes WriteError(path, reason)."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with reported(path):
            _remove(tmp)   # left by a run killed while writing it
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            _remove(tmp)
        if isinstance(exc, WriteError) and exc.path.startswith(str(tmp)):   # a file in a partial folder
            raise WriteError(str(path) + exc.path[len(str(tmp)):], exc.reason) from None
        raise
    _fsync(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _fsync(path: Path) -> None:
    """Flushes a file, or a folder's entries, to disk (where the OS lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def make_folder(path: PathLike) -> Path:
    """mkdir -p, with WriteError when the OS refuses."""
    with reported(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_npy(path: PathLike, array: np.ndarray) -> None:
    """`np.save`'s .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def write_image(path: PathLike, img: np.ndarray) -> None:
    """An (H, W[, C]) uint8 image, its format from the extension (PNG for
    `.png`), encoded in memory so that only this module touches the file."""
    write_bytes(path, iio.imwrite("<bytes>", img, extension=Path(path).suffix))


def write_mp4(path: PathLike, frames: np.ndarray, fps: int = 30, quality: int = 8) -> None:
    """(F, H, W[, 3]) uint8 frames as an H.264 mp4 through imageio-ffmpeg.

    ffmpeg writes from its own process and imageio does not check how it
    ended: on a full disk it leaves a cut-off file and no error. The
    temporary file must therefore read back as F frames before it is renamed
    into place."""
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, frames, fps=fps, quality=quality, macro_block_size=1)
        try:
            complete = imageio_ffmpeg.count_frames_and_secs(str(tmp))[0] == len(frames)
        except RuntimeError:   # unreadable: cut off before its index was written
            complete = False
        if not complete:
            raise OSError(_why_ffmpeg_failed(tmp))


def _why_ffmpeg_failed(path: Path) -> str:
    """The operating system's reason, when it is a file-size limit or a full
    disk, that ffmpeg did not finish writing `path`."""
    size = path.stat().st_size if path.exists() else 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size >= limit:
        return f"{os.strerror(errno.EFBIG)} (ffmpeg could not finish the video)"
    if shutil.disk_usage(path.parent).free < size + (1 << 20):
        return f"{os.strerror(errno.ENOSPC)} (ffmpeg could not finish the video)"
    return "ffmpeg could not write the video (its own messages above say why)"


@contextmanager
def warn_on_write_error(consequence: str = "training goes on") -> Iterator[None]:
    """For outputs the run can do without (videos, test renders): a WriteError
    inside becomes one line, `warning: <path>: <reason>; <consequence>`."""
    try:
        yield
    except WriteError as err:
        log.warning("warning: %s; %s", err, consequence)


class EventLog:
    """The run's TensorBoard log: SummaryWriter's add_scalar, add_image and close.

    A write that fails (the events file cannot grow) is one warning naming the
    folder; logging stops there and training goes on. The writer's background
    thread would print that error's traceback too: EventLog silences its own
    thread's OSErrors, which it reports itself at the next call.
    """

    def __init__(self, logdir: PathLike):
        from torch.utils.tensorboard import SummaryWriter
        self.logdir = Path(logdir)
        before = set(threading.enumerate())
        with reported(self.logdir):
            self._writer = SummaryWriter(str(self.logdir))
        self._threads = set(threading.enumerate()) - before
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_error

    def _thread_error(self, hook_args) -> None:
        if hook_args.thread in self._threads and issubclass(hook_args.exc_type, OSError):
            return
        self._previous_hook(hook_args)

    def _call(self, method: str, *args, **kwargs) -> None:
        if self._writer is None:
            return
        try:
            with reported(self.logdir):
                getattr(self._writer, method)(*args, **kwargs)
        except WriteError as err:
            log.warning("warning: %s; TensorBoard logging stops here, training goes on", err)
            writer, self._writer = self._writer, None
            with suppress(OSError):
                writer.close()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def add_image(self, tag: str, img, step: int, dataformats: str = "CHW") -> None:
        self._call("add_image", tag, img, step, dataformats=dataformats)

    def close(self) -> None:
        """Flushes (so that a failure of the last writes is reported) and closes."""
        self._call("flush")
        self._call("close")
        threading.excepthook = self._previous_hook
