"""The two exceptions a run reports in one line instead of a traceback.

`DataError`: bad user input (a file, folder or flag); the command line prints
`error: <where>: <what>` and exits with status 2.
`WriteError`: the operating system refused to write one of the run's files (a
full disk, a quota or file-size limit, a folder that cannot be made); printed
as `error: <path>: <reason>` with status 1 where the run cannot go on, as a
warning where it can (see nerf/outputs.py).
"""
import re
import sys
from os import PathLike
from typing import Callable, Optional, Sequence, Union


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


class DataError(Exception):
    """Bad input found in a file, folder or flag (`where`), explained in `what`."""

    def __init__(self, where: Union[str, PathLike], what: str):
        self.where = str(where)
        self.what = _one_line(what)   # always one line
        super().__init__(f"{self.where}: {self.what}")


class WriteError(Exception):
    """`path` could not be written; `reason` is the operating system's (e.g. 'File too large')."""

    def __init__(self, path: Union[str, PathLike], reason: str):
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


def exit_status(program: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """`program(argv)`'s exit status, where a DataError (bad input) is printed as its
    one line (`error: <where>: <what>`) with status 2, and a WriteError (the OS
    refused a write) likewise with status 1; with --debug they are raised instead."""
    try:
        return program(argv)
    except (DataError, WriteError) as err:
        if "--debug" in (argv if argv is not None else sys.argv[1:]):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, DataError) else 1
