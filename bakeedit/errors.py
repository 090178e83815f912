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


class OutputNotOursError(OutputExistsError):
    """``--overwrite`` was given, but the output holds something bakeedit did not write (it is never deleted)."""

    hint = "--overwrite replaces only what bakeedit wrote: move those files away, or choose another -o"


class OutputPathError(BakeeditError):
    """The ``-o`` path is empty, or is/contains/lies inside a folder that replacing it would destroy."""

    hint = "choose a new folder of its own for -o, e.g. -o ./debiased-model"


class VerificationError(BakeeditError):
    """The saved checkpoint does not reproduce the runtime edit within the tolerance."""


class ManifestError(VerificationError):
    """A baked folder is not what its ``bakeedit.json`` records: a file missing, changed or not listed, a field
    edited by hand, or a manifest too old to list every file. Verify, card and push refuse such a folder."""

    hint = "re-run bakeedit apply; do not edit a baked folder by hand (bakeedit card / eval keep it valid)"


class DataError(BakeeditError):
    """A data file is missing or malformed."""
