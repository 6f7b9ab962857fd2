"""Errors the user can fix: each carries a one-line message naming the problem and what to do.

The command-line scripts catch :class:`LdmError` (including :class:`ldm.checkpoint.CheckpointError`), print the
message on one line of stderr and exit with :attr:`LdmError.exit_code`; anything else is a bug.
"""
from __future__ import annotations


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
