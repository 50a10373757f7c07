"""The one exception type for bad user input: a file or flag and what is wrong with it.

The command line prints it as `error: <where>: <what>` and exits with status 2.
"""
import re
from os import PathLike
from typing import Union


class DataError(Exception):
    """Bad input found in a file, folder or flag (`where`), explained in `what`."""

    def __init__(self, where: Union[str, PathLike], what: str):
        self.where = str(where)
        self.what = re.sub(r"\s*\n\s*", " ", str(what)).strip()   # always one line
        super().__init__(f"{self.where}: {self.what}")
