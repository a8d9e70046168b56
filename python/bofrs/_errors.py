"""Exceptions raised by bofrs."""

from __future__ import annotations


class FormatError(ValueError):
    """A file is not a valid bofrs file: truncated, tampered with, or of an unknown version."""
