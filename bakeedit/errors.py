"""Domain errors. Each is raised where its cause is known and carries a hint for the user.

The CLI shows ``str(error)`` as one line plus ``error.hint``; ``--debug`` adds the traceback.
"""

from __future__ import annotations


class BakeeditError(Exception):
    """Base class of every error bakeedit reports to a user."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class RecipeError(BakeeditError):
    """A recipe file cannot be read or does not follow the schema."""


class NeuronSetError(BakeeditError):
    """A neuron list is malformed or does not fit the model."""


class UnsupportedArchitecture(BakeeditError):
    """The model's architecture has no ArchSpec, or lacks the requested site."""


class ModelLoadError(BakeeditError):
    """A model reference cannot be resolved or loaded."""


class EditError(BakeeditError):
    """An edit plan is invalid or cannot be applied to these weights."""


class OutputExistsError(BakeeditError):
    """The output folder exists and ``--overwrite`` was not given."""

    hint = "pass --overwrite to replace it, or choose another -o folder"


class VerificationError(BakeeditError):
    """The saved checkpoint does not reproduce the runtime edit within the tolerance."""


class DataError(BakeeditError):
    """A data file is missing or malformed."""
