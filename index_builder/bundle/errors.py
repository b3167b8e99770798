"""Errors every package may raise: the base of those a user can act on, and a bundle's."""
from __future__ import annotations


class SineError(Exception):
    """The base of every error a user can act on (bad input, a bad environment): the `sine`
    command prints its message as one line and exits 2. Here because this contract module is the
    one every package may import."""


class BundleError(SineError, RuntimeError):
    """A bundle cannot be used; the message names the bundle, the file and the problem."""
