"""Model selection and early stopping on the validation AUC: the ``paper`` rule and the authors' (``official``).

Both are fed one epoch at a time with ``update(epoch, val_auc, val_ce)`` (``epoch`` counted from 1) and answer
whether this epoch's weights become the kept checkpoint and whether training stops after it.

* :class:`PaperStopping` keeps the epoch with the best (AUC, -CE) key, strictly better only (an undefined AUC
  ranks lowest), and stops after ``patience`` epochs without a better key, never before ``min_epochs``.
* :class:`OfficialStopping` is the released code's ``EarlyStopping(patience, stop_epoch)``: a tied AUC counts as
  an improvement (the later checkpoint is kept); a lower AUC counts a bad epoch, and training stops once
  ``patience`` bad epochs have accumulated since the last improvement and the 0-indexed epoch is above
  ``stop_epoch``. With the authors' ``patience=1, stop_epoch=1`` it stops the first time the AUC drops once the
  0-indexed epoch is above 1. An undefined AUC (one class in validation) is 0.5, as their validation loop gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

RULES = ("paper", "official")


@dataclass(frozen=True)
class Decision:
    """What one epoch's validation decided."""

    keep: bool  # this epoch's weights are the new kept checkpoint
    stop: bool  # training ends after this epoch


class Stopping(Protocol):
    def update(self, epoch: int, val_auc: float, val_ce: float) -> Decision: ...

    def state_dict(self) -> dict[str, Any]:
        """What ``update`` remembers between epochs (JSON-serialisable), for resuming a killed run."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PaperStopping:
    """Best (AUC, -CE), strict; stop after ``patience`` stale epochs, not before ``min_epochs``."""

    def __init__(self, patience: int, min_epochs: int) -> None:
        self.patience, self.min_epochs = patience, min_epochs
        self.best = (-math.inf, -math.inf)
        self.stale = 0

    def update(self, epoch: int, val_auc: float, val_ce: float) -> Decision:
        key = (val_auc if not math.isnan(val_auc) else -math.inf, -val_ce)
        keep = key > self.best
        if keep:
            self.best, self.stale = key, 0
        else:
            self.stale += 1
        return Decision(keep, epoch >= self.min_epochs and self.stale >= self.patience)

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best), "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        auc, neg_ce = state["best"]
        self.best, self.stale = (float(auc), float(neg_ce)), int(state["stale"])


class OfficialStopping:
    """The authors' ``EarlyStopping``: ties improve, stop after ``patience`` drops once epoch - 1 > ``stop_epoch``."""

    def __init__(self, patience: int = 1, stop_epoch: int = 1) -> None:
        self.patience, self.stop_epoch = patience, stop_epoch
        self.best: float | None = None
        self.counter = 0

    def update(self, epoch: int, val_auc: float, val_ce: float) -> Decision:
        score = 0.5 if math.isnan(val_auc) else val_auc
        if self.best is not None and score < self.best:
            self.counter += 1
            return Decision(False, self.counter >= self.patience and epoch - 1 > self.stop_epoch)
        self.best, self.counter = score, 0
        return Decision(True, False)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.counter = int(state["counter"])


def make_stopping(rule: str, patience: int, min_epochs: int) -> Stopping:
    """The rule named by ``TrainConfig.protocol``; ``official`` uses the authors' ``stop_epoch = 1``."""
    if rule == "paper":
        return PaperStopping(patience, min_epochs)
    if rule == "official":
        return OfficialStopping(patience, stop_epoch=1)
    raise ValueError(f"stopping rule must be one of {', '.join(RULES)} (got {rule!r})")
