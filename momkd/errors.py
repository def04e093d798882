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


class SlideDuplicateCoordsError(SlideError):
    """Two or more patches at the same coordinates (``momkd.graph.DuplicateCoordsError``)."""

    code = "duplicate_coords"


class SlideEncoderError(SlideError):
    """The slide's ``encoder`` attribute names another encoder than the model's (same width, other features)."""

    code = "encoder"


class SlideEmptyError(SlideError):
    """N = 0: the slide has no tissue patches."""

    code = "empty"


class SlideFeatureDimError(SlideError):
    """Feature dimension differs from what the model expects."""

    code = "feature_dim"


class SlideDtypeError(SlideUnreadableError):
    """``features`` are not float16/float32/float64/bfloat16, or ``coords`` are not integers or floats (bool, enum,
    strings...): the data cannot be read as what it must be."""

    code = "bad_dtype"


class SlideCoordsError(SlideError):
    """``coords`` are not level-0 pixel positions: non-integral values or values beyond +-2**31."""

    code = "bad_coords"


class SlideIncompleteError(SlideError):
    """Rows of ``features`` or ``coords`` were never written (unallocated chunks or storage: an interrupted writer);
    HDF5 would read them back as fill values."""

    code = "incomplete"


class SlideExternalDataError(SlideError):
    """``features`` or ``coords`` are not stored in the file itself: a soft or external link (also a dangling or
    looping one), a virtual dataset or external raw storage. Such data is never followed."""

    code = "external_data"


class SlideFilterError(SlideError):
    """``features`` or ``coords`` are compressed with an HDF5 filter this installation does not have."""

    code = "missing_filter"


class SlideBeingWrittenError(SlideError):
    """Another program holds the file open for writing, or its writer never closed it."""

    code = "being_written"


class CohortError(MomkdError):
    """The cohort table cannot be used."""


class OmicsError(MomkdError):
    """The omics data cannot be used."""


class ModelFolderError(MomkdError):
    """A model folder (manifest, checksums, artifacts) cannot be used."""


class RunFolderError(MomkdError):
    """A training run folder is missing or incomplete."""
