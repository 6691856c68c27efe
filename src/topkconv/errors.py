"""Errors a user can fix, as opposed to bugs.

The command line (:func:`topkconv.cli.main`) prints a user error (:func:`is_user_error`) as one line and
exits with status 2; any other exception is a one-line ``internal error`` with status 1 (``--debug`` or
``TOPKCONV_DEBUG=1`` shows the traceback instead). Raise a :class:`UserError` with a message that names the
file or the flag and says what was expected.
"""

from __future__ import annotations

import linecache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


class UserError(ValueError):
    """A mistake in the input: a flag, a spec file, a data file or a run folder. Exit status 2."""


def is_user_error(err: BaseException) -> bool:
    """A mistake in the input, reported as such: a :class:`UserError`, an ``OSError`` (a file that cannot be
    read or written), or a ``ValueError`` that topkconv raised on purpose, i.e. at a ``raise`` statement of its
    own code (the validation of configs, specs, data and arguments). A ``ValueError`` raised anywhere else
    (torch, numpy, Python itself, a user's callback) is a bug or a failure, not a user error."""
    if isinstance(err, (UserError, OSError)):
        return True
    if not isinstance(err, ValueError) or err.__traceback__ is None:
        return False
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    if _PACKAGE not in filename.parents:
        return False
    return linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise")


def one_line(err: BaseException) -> str:
    """``err`` as one line that names the file: an ``OSError`` becomes ``FILE: reason``."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
        if err.filename2 is not None:
            text = f"{err.filename} -> {err.filename2}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
        if isinstance(err, KeyError):  # str(KeyError('x')) is "'x'", which says nothing
            text = f"missing key {text}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def without_unsafe_advice(err: BaseException) -> str:
    """``torch.load``'s error without its advice to retry with ``weights_only=False``: with a file from an
    unknown source that advice is how its code gets run. Keeps the reason (e.g. the refused global)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line]
    return f"{type(err).__name__}: {' '.join(kept) or 'the file holds objects other than tensors'}"
