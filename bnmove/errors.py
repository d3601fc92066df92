"""One exception family for user errors.

Everything raised as [`BnmoveError`][bnmove.BnmoveError] is the user's to fix (a bad file, a
missing option, a model that cannot be traced); the CLI turns it into one line
on stderr and exit code 1. Anything else is a bug in bnmove.
"""

from __future__ import annotations


class BnmoveError(Exception):
    """A problem with the user's input, explained in one line."""


class LoadError(BnmoveError):
    """The model file or architecture could not be loaded."""


class ModelRunError(BnmoveError):
    """The user's model raised while bnmove ran it."""


class VerificationError(BnmoveError):
    """A conversion that promised to keep outputs did not."""
