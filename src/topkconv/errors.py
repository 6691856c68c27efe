"""Errors a user can fix, as opposed to bugs.

The command line (:func:`topkconv.cli.main`) prints any :class:`UserError` (and any other ``ValueError``
or ``OSError``) as one line and exits with status 2; ``--debug`` or ``TOPKCONV_DEBUG=1`` shows the
traceback instead. Raise one with a message that names the file or the flag and says what was expected.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the input: a flag, a spec file, a data file or a run folder. Exit status 2."""


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
