"""Exceptions a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

__all__ = ["UserError", "DataFormatError", "ConfigError", "JobFailedError", "npy_error"]


class UserError(Exception):
    """An error caused by the user's input (a file, a flag, a config key).

    The message must name the file/record/key and say what is wrong; the CLI prints it
    as a single line without a traceback (unless ``--debug``).
    """


class DataFormatError(UserError, ValueError):
    """A data file does not have the format it claims (RecordIO, Parquet shard, IJB-C meta)."""


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, impossible value)."""


class JobFailedError(RuntimeError):
    """Distributed work failed for good after its retries (a worker, actor or node kept dying).

    Not the user's input; the message says which step and what was retried. The CLI prints it
    as one line and exits with status 1 (``--debug`` shows the traceback).
    """


def npy_error(path: object, err: BaseException) -> DataFormatError:
    """The error for a ``.npy`` that ``np.load(..., allow_pickle=False)`` would not read.

    An object array is a pickle (loading it could run code): it is refused, and said so.
    """
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Object arrays" in msg or "Python objects" in msg:
        return DataFormatError(f"{path}: refused to load: the array holds Python objects (a pickle, which "
                               "could run code); only numeric .npy arrays are read")
    if "pickled" in msg:  # numpy takes any file without the .npy magic for a pickle
        return DataFormatError(f"{path}: not a .npy array (no .npy header; the file is refused, not unpickled)")
    return DataFormatError(f"{path}: not a readable .npy array ({msg[:160]})")
