"""Errors a user can act on.

Every `KilnError` carries one readable line. The CLI prints that line and exits non-zero
without a traceback; anything that is not a `KilnError` is a bug in kiln and keeps its
traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class for errors caused by input, environment or artifacts, not by kiln bugs."""

    exit_code: int = 2


class SourceError(KilnError):
    """The source model cannot be found, read, or is not a supported architecture."""


class UnsupportedModelError(SourceError):
    """The source is a model, but not one kiln knows how to compile."""


class ExportError(KilnError):
    """Exporting a component failed, or its parity against PyTorch is out of budget."""


class ArtifactError(KilnError):
    """An artifact folder is missing, corrupt, tampered with, or incompatible."""


class BackendUnavailableError(KilnError):
    """A runtime or backend needed for the request is not installed or has no device."""


class InvalidRequestError(KilnError):
    """Generation or captioning arguments are out of range (size, steps, strength, ...)."""


class OutputPathError(KilnError):
    """An output path cannot be written: a file where a folder must go, or the reverse."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error text (or its type's name), to quote in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
