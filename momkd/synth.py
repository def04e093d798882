"""A synthetic paired cohort in the real formats: TRIDENT ``.h5`` slides, an omics CSV and a cohort CSV.

The label (``her2_status``: Positive / Negative, about 40 % positive) is learnable from both modalities:

* omics, strongly: a few fixed "signal" genes are several-fold higher in positive cases;
* histology, more weakly: most positive slides hold one or two spatially compact clusters of patches whose
  features are shifted along a fixed random "signal" direction; about half the negative slides hold such
  clusters along another direction, some negatives mimic a weak positive cluster and some positives show
  none. On the default cohort a gated-attention MIL model reaches a 5-fold test AUC of about 0.8-0.9 and
  an oracle that knows the signal direction about 0.83-0.93 (seeds 0-2): learnable, not trivial.

``kind="study"`` writes a harder cohort for learning studies (benchmarks/learning_study), with a molecular
state behind the label, a small spatially clustered histology signal, per-slide stain shift and label noise,
at three difficulties; its generative model is documented on :func:`make_synthetic_cohort`.

The "biology" (signal directions, tissue prototypes, signal genes, gene baselines) depends only on
``feature_dim`` and ``genes`` (and the kind), never on ``seed``: cohorts with different seeds are independent
samples of the same task (a model trained on one can be evaluated on another). Everything is a pure function
of the arguments.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

LABEL_COL = "her2_status"
POSITIVE = "Positive"
NEGATIVE = "Negative"
PATCH_SIZE = 256
ENCODER = "synthetic"
_BIOLOGY_SEED = 20260315
_N_TISSUE_TYPES = 4
_N_SIGNAL_GENES = 6
_N_PROGRAMS = 3
KINDS = ("default", "study")
_STUDY_SIGNAL_GENES = 8
_STUDY_POSITIVE_SHARE = 0.4
_STAIN_OFFSET_SD = 0.5   # per-slide offset of every feature, per dimension, in patch-noise SDs
_STAIN_LOG_SCALE_SD = 0.15   # per-slide log scale of the features


@dataclass(frozen=True)
class Difficulty:
    """The knobs of the ``study`` cohort (see :func:`make_synthetic_cohort`)."""

    strength: float  # amplitude of the region shift along its direction, in patch-noise SDs (x U(0.75, 1.25))
    fraction: float  # share of every slide's patches inside its one or two regions
    label_noise: float  # share of cases whose recorded label is the opposite of their molecular state


DIFFICULTIES = {
    "easy": Difficulty(strength=4.0, fraction=0.15, label_noise=0.05),
    "medium": Difficulty(strength=3.0, fraction=0.12, label_noise=0.10),
    "hard": Difficulty(strength=2.5, fraction=0.10, label_noise=0.15),
}


@dataclass(frozen=True)
class SyntheticCohort:
    """Where a synthetic cohort was written, and how to read its labels.

    ``truth_csv``, ``signal_masks`` and ``patch_tissue`` exist for ``kind="study"`` only (None otherwise): per
    case the molecular state, the state's class and whether the recorded label was flipped; per slide id (two
    ``.npz``) the boolean mask (N,) of the patches inside the signal regions and each patch's tissue type (N,).
    """

    cohort_csv: Path
    features_dir: Path
    omics_path: Path
    label_col: str = LABEL_COL
    positive: str = POSITIVE
    truth_csv: Path | None = None
    signal_masks: Path | None = None
    patch_tissue: Path | None = None


def write_slide_h5(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    *,
    fmt: str = "trident",
    encoder: str = ENCODER,
    patch_size_level0: int = PATCH_SIZE,
    magnification: float = 20.0,
) -> Path:
    """Write one slide feature file the way TRIDENT or CLAM does.

    Args:
        features: (N, D), written in its own dtype (float32 or float16), one-row chunks.
        coords: (N, 2) level-0 top-left corners; int64 for ``"trident"``, int32 for ``"clam"``.
        fmt: ``"trident"`` (with ``coords``/``features`` attributes) or ``"clam"`` (no attributes).
    """
    if fmt not in ("trident", "clam"):
        raise ValueError(f"fmt must be 'trident' or 'clam', got {fmt!r}")
    import h5py  # here, so that the CLI can read KINDS / DIFFICULTIES without loading h5py

    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64 if fmt == "trident" else np.int32)
    with h5py.File(path, "w") as h5:
        f, c = (h5.create_dataset(name, data=data, chunks=(1,) + data.shape[1:], maxshape=(None,) + data.shape[1:])
                for name, data in (("features", features), ("coords", coords)))
        if fmt == "trident":
            c.attrs.update({"patch_size": patch_size_level0, "patch_size_level0": patch_size_level0,
                            "level0_magnification": magnification, "target_magnification": magnification,
                            "overlap": 0, "name": path.stem})
            f.attrs.update({"encoder": encoder, "name": path.stem})
    return path


def make_synthetic_cohort(
    out_dir: str | os.PathLike[str],
    cases: int = 60,
    feature_dim: int = 64,
    genes: int = 200,
    seed: int = 0,
    slides_per_case: tuple[int, int] = (1, 2),
    patches: tuple[int, int] = (150, 600),
    kind: str = "default",
    difficulty: str = "medium",
    tissue_types: int = _N_TISSUE_TYPES,
) -> SyntheticCohort:
    """Write ``out_dir/cohort.csv``, ``out_dir/features/*.h5`` (TRIDENT) and ``out_dir/omics.csv``.

    ``kind="default"`` is the cohort of the module docstring. ``kind="study"`` follows this generative model
    (``difficulty`` picks ``DIFFICULTIES[difficulty]``: signal strength a, region fraction f, label noise e):

    1. Each case has a molecular state s ~ N(0, 1). The round(0.4 x cases) cases with the highest s are
       state-positive; the recorded label is the state's class except for round(e x cases) random cases,
       whose label is flipped (assay error). ``truth.csv`` keeps s, the state class and the flip.
    2. Omics: log-mean expression = gene baseline + per-case noise + random co-expression programs, plus
       g_j x s for 8 fixed signal genes (g_j = +-U(0.5, 1.0)); counts ~ Poisson(exp(log-mean)). The genes
       follow the continuous state, so they predict the recorded label up to the label noise.
    3. Histology: a slide is an irregular tissue blob of N ~ U{patches} cells on the patch grid, split into
       the Voronoi territories of 3 random cells, each of one of ``tissue_types`` fixed tissue types (prototype
       vectors, equally frequent over the cohort); every patch = its prototype + N(0, I_D) noise. Every slide,
       whatever its class, holds exactly round(f x N) "region" patches in one or two contiguous regions (each
       the cells nearest a random centre; ``signal_masks.npz``) shifted by A ~ a x U(0.75, 1.25) along a fixed
       direction: the signal direction u for state-positive cases, an orthogonal "benign" direction v for
       state-negative ones. The prototypes have little variation along u and v, so only the direction of a
       small region tells the classes apart (not the presence of one).
    4. Stain shift: all features of a slide are then scaled by exp(N(0, 0.15^2)) and offset by a per-slide
       vector ~ N(0, 0.5^2 I_D): a slide-level fingerprint (norm ~0.5 sqrt(D)) that carries no label, which
       a model can memorise instead of finding the small regions.

    Calibration (benchmarks/learning_study/RESULTS.md): at 200 cases, 80-240 patches, D = 64, seed 1, an oracle
    that knows u and v (top-10 % mean along u minus along v, per slide) reaches AUC 0.94 / 0.88 / 0.84 (easy /
    medium / hard) against the recorded labels, and ABMIL 5-fold test AUC 0.79 +- 0.06 on ``medium``.

    Args:
        cases: number of cases (patients), about 40 % positive (at least one of each class for ``default``).
        feature_dim: D of the patch features.
        genes: number of omics genes (raw non-negative counts).
        seed: sampling seed (cases, slides, patches, noise); the same seed gives the same files.
        slides_per_case: inclusive range of slides per case.
        patches: inclusive range of patches per slide.
        kind: ``"default"`` or ``"study"``.
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (``study`` only).
        tissue_types: number of tissue prototypes (``study`` only; the memory study varies it).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)} (got {difficulty!r})")
    n_genes_min = (_N_SIGNAL_GENES if kind == "default" else _STUDY_SIGNAL_GENES) + 2
    if tissue_types < 1:
        raise ValueError(f"tissue_types must be >= 1 (got {tissue_types})")
    if cases < 2 or feature_dim < 2 or genes < n_genes_min:
        raise ValueError(f"need cases >= 2, feature_dim >= 2, genes >= {n_genes_min}")
    if not 1 <= slides_per_case[0] <= slides_per_case[1] or not 1 <= patches[0] <= patches[1]:
        raise ValueError("slides_per_case and patches must be ranges (lo, hi) with 1 <= lo <= hi")
    out = Path(out_dir)
    features_dir = out / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    if kind == "study":
        return _study_cohort(out, cases, feature_dim, genes, seed, slides_per_case, patches, DIFFICULTIES[difficulty],
                             tissue_types)
    rng = np.random.default_rng(seed)
    histology = _Histology(feature_dim)

    n_pos = min(max(1, round(0.4 * cases)), cases - 1)
    labels = rng.permutation(np.arange(cases) < n_pos).astype(np.int64)
    case_ids = [f"SYN-{i + 1:04d}" for i in range(cases)]

    rows: list[list[str]] = []
    for case, label in zip(case_ids, labels):
        phenotype = _phenotype(rng, label)
        for j in range(int(rng.integers(slides_per_case[0], slides_per_case[1] + 1))):
            slide_id = f"{case}-DX{j + 1}"
            n = int(rng.integers(patches[0], patches[1] + 1))
            shows = phenotype is not None and (j == 0 or rng.random() < 0.6)
            features, coords = histology.slide(rng, n, phenotype if shows else None)
            write_slide_h5(features_dir / f"{slide_id}.h5", features, coords)
            name = f"{slide_id}.svs" if len(rows) % 2 == 0 else slide_id
            rows.append([case, name, POSITIVE if label else NEGATIVE])

    cohort_csv = _write_csv(out / "cohort.csv", ["case_id", "slide_id", LABEL_COL], rows)
    counts = _omics(rng, labels, genes)
    omics_path = _write_omics(out / "omics.csv", case_ids, counts)
    return SyntheticCohort(cohort_csv=cohort_csv, features_dir=features_dir, omics_path=omics_path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_omics(path: Path, case_ids: list[str], counts: np.ndarray) -> Path:
    return _write_csv(path, ["case_id"] + [f"GENE{j + 1:04d}" for j in range(counts.shape[1])],
                      [[case] + row for case, row in zip(case_ids, counts.tolist())])


def _study_cohort(out: Path, cases: int, feature_dim: int, genes: int, seed: int, slides_per_case: tuple[int, int],
                  patches: tuple[int, int], knobs: Difficulty, tissue_types: int) -> SyntheticCohort:
    """``kind="study"`` (generative model on :func:`make_synthetic_cohort`)."""
    rng = np.random.default_rng([seed, 1])
    histology = _StudyHistology(feature_dim, tissue_types)
    case_ids = [f"SYN-{i + 1:04d}" for i in range(cases)]
    state = rng.standard_normal(cases)
    n_pos = min(max(1, round(_STUDY_POSITIVE_SHARE * cases)), cases - 1)
    state_label = np.zeros(cases, dtype=np.int64)
    state_label[np.argsort(-state, kind="stable")[:n_pos]] = 1
    flipped = np.zeros(cases, dtype=bool)
    flipped[rng.permutation(cases)[: round(knobs.label_noise * cases)]] = True
    labels = np.where(flipped, 1 - state_label, state_label)

    rows: list[list[str]] = []
    masks: dict[str, np.ndarray] = {}
    tissue: dict[str, np.ndarray] = {}
    for case, label, positive_state in zip(case_ids, labels, state_label):
        for j in range(int(rng.integers(slides_per_case[0], slides_per_case[1] + 1))):
            slide_id = f"{case}-DX{j + 1}"
            n = int(rng.integers(patches[0], patches[1] + 1))
            features, coords, masks[slide_id], tissue[slide_id] = histology.slide(rng, n, int(positive_state), knobs)
            write_slide_h5(out / "features" / f"{slide_id}.h5", features, coords)
            rows.append([case, slide_id, POSITIVE if label else NEGATIVE])

    cohort_csv = _write_csv(out / "cohort.csv", ["case_id", "slide_id", LABEL_COL], rows)
    omics_path = _write_omics(out / "omics.csv", case_ids, _study_omics(rng, state, genes))
    truth_csv = _write_csv(out / "truth.csv", ["case_id", "molecular_state", "state_label", "label_flipped"],
                           [[c, f"{s:.6f}", int(y), int(f)]
                            for c, s, y, f in zip(case_ids, state, state_label, flipped)])
    # numeric arrays only (no pickle); numpy 1.x has no allow_pickle here (it would be saved as an array)
    np.savez_compressed(out / "signal_masks.npz", **cast(dict[str, Any], masks))
    np.savez_compressed(out / "patch_tissue.npz", **cast(dict[str, Any], tissue))
    return SyntheticCohort(cohort_csv=cohort_csv, features_dir=out / "features", omics_path=omics_path,
                           truth_csv=truth_csv, signal_masks=out / "signal_masks.npz",
                           patch_tissue=out / "patch_tissue.npz")


class _StudyHistology:
    """The ``study`` cohort's fixed tissue prototypes and its signal (u) and benign (v) directions."""

    def __init__(self, feature_dim: int, tissue_types: int = _N_TISSUE_TYPES) -> None:
        biology = np.random.default_rng([_BIOLOGY_SEED, feature_dim, 1])
        q, _ = np.linalg.qr(biology.standard_normal((feature_dim, 2)))
        self.directions = q.T  # (2, D) orthonormal: u (state-positive regions), v (state-negative regions)
        prototypes = biology.standard_normal((tissue_types, feature_dim))
        self.prototypes = prototypes - 0.8 * prototypes @ self.directions.T @ self.directions
        self.dim = feature_dim

    def slide(self, rng: np.random.Generator, n: int, positive_state: int,
              knobs: Difficulty) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(features (n, D) float32, coords (n, 2) int64, region mask (n,) bool, tissue type (n,) int8) of one
        slide."""
        grid = _blob(rng, n)
        seeds = grid[rng.choice(n, size=min(3, n), replace=False)]
        tissue = rng.integers(0, len(self.prototypes), size=len(seeds))
        types = tissue[np.argmin(((grid[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)]
        features = self.prototypes[types] + rng.standard_normal((n, self.dim))
        size = round(knobs.fraction * n)
        mask = _regions(rng, grid, size, 2 if size >= 2 and rng.random() < 0.5 else 1)
        amplitude = knobs.strength * rng.uniform(0.75, 1.25)
        features[mask] += amplitude * self.directions[0 if positive_state else 1]
        scale = np.exp(_STAIN_LOG_SCALE_SD * rng.standard_normal())
        features = scale * features + _STAIN_OFFSET_SD * rng.standard_normal(self.dim)
        coords = (grid + rng.integers(20, 60, size=2)) * PATCH_SIZE
        return features.astype(np.float32), coords.astype(np.int64), mask, types.astype(np.int8)


def _regions(rng: np.random.Generator, grid: np.ndarray, size: int, count: int) -> np.ndarray:
    """(n,) bool mask of ``size`` cells in ``count`` regions, each the free cells nearest a random free centre."""
    mask = np.zeros(len(grid), dtype=bool)
    for part in np.array_split(np.arange(size), count):
        free = np.flatnonzero(~mask)
        centre = grid[free[rng.integers(len(free))]]
        d2 = ((grid - centre) ** 2).sum(1).astype(np.float64)
        d2[mask] = np.inf
        mask[np.argsort(d2, kind="stable")[: len(part)]] = True
    return mask


def _study_omics(rng: np.random.Generator, state: np.ndarray, genes: int) -> np.ndarray:
    """(cases, genes) int64 counts: baselines and programs as ``_omics``, signal genes following the state."""
    biology = np.random.default_rng([_BIOLOGY_SEED + 1, genes, 1])
    baseline = biology.normal(3.5, 1.2, size=genes)
    spread = biology.uniform(0.2, 0.6, size=genes)
    loadings = biology.normal(0.0, 0.5, size=(_N_PROGRAMS, genes)) * (biology.random((_N_PROGRAMS, genes)) < 0.3)
    signal_genes = biology.choice(genes, size=_STUDY_SIGNAL_GENES, replace=False)
    gain = biology.uniform(0.5, 1.0, size=_STUDY_SIGNAL_GENES) * biology.choice([-1.0, 1.0], size=_STUDY_SIGNAL_GENES)

    n = len(state)
    log_mean = baseline + spread * rng.standard_normal((n, genes)) + rng.standard_normal((n, _N_PROGRAMS)) @ loadings
    log_mean[:, signal_genes] += state[:, None] * gain
    return rng.poisson(np.exp(log_mean)).astype(np.int64)


def _phenotype(rng: np.random.Generator, label: int) -> tuple[int, float] | None:
    """A case's histology signal: (direction 0 = positive / 1 = other, strength in noise units) or none."""
    u = rng.random()
    if label:
        if u < 0.8:
            return 0, float(rng.uniform(3.5, 5.5))   # typical positive
        return (0, float(rng.uniform(0.5, 1.0))) if u < 0.9 else None   # faint or silent positive
    if u < 0.5:
        return 1, float(rng.uniform(3.5, 5.5))       # negative with its own kind of cluster
    return (0, float(rng.uniform(0.8, 1.5))) if u < 0.65 else None   # positive mimic, or plain


class _Histology:
    """Fixed tissue prototypes and signal directions for a feature dim; samples slides."""

    def __init__(self, feature_dim: int) -> None:
        biology = np.random.default_rng([_BIOLOGY_SEED, feature_dim])
        q, _ = np.linalg.qr(biology.standard_normal((feature_dim, 2)))
        self.directions = q.T           # (2, D) orthonormal: positive signal, other signal
        prototypes = biology.standard_normal((_N_TISSUE_TYPES, feature_dim))
        along = prototypes @ self.directions.T @ self.directions
        self.prototypes = prototypes - 0.8 * along   # tissue types vary little along the signal directions
        self.dim = feature_dim

    def slide(self, rng: np.random.Generator, n: int,
              signal: tuple[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, D) float32, coords (n, 2) int64) of one tissue blob, raster order."""
        grid = _blob(rng, n)
        seeds = grid[rng.choice(n, size=min(3, n), replace=False)]
        tissue = rng.integers(0, _N_TISSUE_TYPES, size=len(seeds))
        nearest = np.argmin(((grid[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
        features = self.prototypes[tissue[nearest]] + rng.standard_normal((n, self.dim))
        features += 0.2 * rng.standard_normal(self.dim)                      # slide-level stain/batch effect
        if signal is not None:
            direction, strength = signal
            for _ in range(int(rng.integers(1, 3))):
                centre = grid[rng.integers(n)]
                radius = max(1.5, np.sqrt(rng.uniform(0.08, 0.18) * n / np.pi))
                d = np.sqrt(((grid - centre) ** 2).sum(1))
                inside = d <= radius
                weight = strength * (1.0 - 0.4 * d[inside] / radius)
                features[inside] += weight[:, None] * self.directions[direction]
        origin = rng.integers(20, 60, size=2)
        coords = (grid + origin) * PATCH_SIZE
        return features.astype(np.float32), coords.astype(np.int64)


def _blob(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) int grid cells (x, y) of an irregular elliptic tissue blob, in raster (y, then x) order."""
    side = int(np.ceil(2.6 * np.sqrt(n))) + 4
    y, x = np.mgrid[0:side, 0:side]
    cx = cy = (side - 1) / 2
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.55, 1.0)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wobble = 1 + 0.15 * np.sin(3 * theta + phase[0]) + 0.08 * np.sin(5 * theta + phase[1])
    r = np.sqrt(u**2 + v**2) / wobble + 0.3 * rng.random(u.shape)
    keep = np.sort(np.argsort(r.ravel(), kind="stable")[:n])   # raster order
    return np.stack([x.ravel()[keep], y.ravel()[keep]], axis=1)


def _omics(rng: np.random.Generator, labels: np.ndarray, genes: int) -> np.ndarray:
    """(cases, genes) int64 counts: gene baselines, a few co-expression programs, strong signal genes."""
    biology = np.random.default_rng([_BIOLOGY_SEED + 1, genes])
    baseline = biology.normal(3.5, 1.2, size=genes)
    spread = biology.uniform(0.2, 0.6, size=genes)
    loadings = biology.normal(0.0, 0.5, size=(_N_PROGRAMS, genes)) * (biology.random((_N_PROGRAMS, genes)) < 0.3)
    signal_genes = biology.choice(genes, size=_N_SIGNAL_GENES, replace=False)

    n = len(labels)
    log_mean = baseline + spread * rng.standard_normal((n, genes)) + rng.standard_normal((n, _N_PROGRAMS)) @ loadings
    activity = np.where(labels == 1, rng.uniform(0.6, 1.4, size=n), rng.uniform(0.0, 0.25, size=n))
    log_mean[:, signal_genes] += np.log(8.0) * activity[:, None]
    return rng.poisson(np.exp(log_mean)).astype(np.int64)


def grid_coords(n: int, seed: int = 0, patch: int = 256) -> np.ndarray:
    """(n, 2) int64 TRIDENT-like level-0 patch grid with holes: ``n`` cells of a square grid (80 % filled), in
    row-major order, times ``patch``."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(max(n, 1) / 0.8)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    keep = np.sort(rng.permutation(len(grid))[:n])
    return grid[keep].astype(np.int64) * patch
