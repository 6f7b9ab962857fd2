"""Errors the user can fix: each carries a one-line message naming the problem and what to do.

The command-line scripts catch :class:`LdmError`, print the message on one line of stderr and exit with
:attr:`LdmError.exit_code`; anything else is a bug. :class:`Terminated` is how SIGTERM and SIGHUP reach the code
that cleans up, as Ctrl-C does with ``KeyboardInterrupt``.
"""
from __future__ import annotations

import signal


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class LdmError(Exception):
    """An expected failure (bad flag, missing or unreadable file, unusable input); the message is one line."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # keep it on one line


class InputError(LdmError, ValueError):
    """A flag value, prompt file or image that cannot be used."""

    exit_code = 2


class ModelNotFoundError(LdmError, FileNotFoundError):
    """A config, checkpoint or safety-checker folder that does not exist."""


class DeviceError(LdmError, RuntimeError):
    """A device or precision this machine does not provide."""


class OutputError(LdmError, OSError):
    """The output folder cannot be created or written."""


class TokenizerNotFoundError(ModelNotFoundError):
    """A tokenizer vocabulary (e.g. bert-base-uncased's ``vocab.txt``) that is not on this machine or unusable."""


class CheckpointError(LdmError):
    """A checkpoint that cannot be read or does not fit the model."""


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM or SIGHUP arrives, so cleanup code runs as for Ctrl-C."""

    def __init__(self, signum: int = getattr(signal, "SIGTERM", 15)):
        super().__init__(signum)
        self.signum = signum


INTERRUPTS = (KeyboardInterrupt, Terminated)  # a user or the system stopping a run, not a failure
