"""User-facing errors. Every message is one line and names the file (or case) and the problem."""

from __future__ import annotations

from pathlib import Path


class MomkdError(Exception):
    """Base class of every error momkd reports to a user (never shown with a traceback)."""


class SlideError(MomkdError):
    """A slide feature file that cannot be used. ``str(e) == f"{path}: {message}"``."""

    code = "slide"

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class SlideUnreadableError(SlideError):
    """Zero-byte, truncated, not HDF5, or not readable."""

    code = "unreadable"


class SlideMissingDatasetError(SlideError):
    """``features`` or ``coords`` is absent."""

    code = "missing_dataset"


class SlideShapeError(SlideError):
    """``features`` is not 2-D or ``coords`` is not (N, 2)."""

    code = "bad_shape"


class SlideRowMismatchError(SlideError):
    """``features`` and ``coords`` have different row counts."""

    code = "row_mismatch"


class SlideNonFiniteError(SlideError):
    """NaN or Inf in ``features`` or ``coords``."""

    code = "non_finite"


class SlideEmptyError(SlideError):
    """N = 0: the slide has no tissue patches."""

    code = "empty"


class SlideFeatureDimError(SlideError):
    """Feature dimension differs from what the model expects."""

    code = "feature_dim"


class CohortError(MomkdError):
    """The cohort table cannot be used."""


class OmicsError(MomkdError):
    """The omics data cannot be used."""


class ModelFolderError(MomkdError):
    """A model folder (manifest, checksums, artifacts) cannot be used."""


class RunFolderError(MomkdError):
    """A training run folder is missing or incomplete."""
