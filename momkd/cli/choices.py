"""The CLI's choice options, made from the library's tuples: a choice is defined once, where the library checks it.

Typer lists the values of a ``Literal`` in ``--help`` and refuses any other value before the command runs. To
the type checker each choice is a plain ``str`` (a ``Literal`` of a tuple's values is only known at run time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from momkd.config import GAT_IMPLS, MEMORY_UPDATES, MODELS, PRESETS
from momkd.export.folder import FORMATS
from momkd.runtime.backends import BACKENDS
from momkd.runtime.heatmap_writer import VALUES as HEATMAP_VALUES
from momkd.runtime.reader import POOLS

if TYPE_CHECKING:
    Preset = str
    ModelName = str
    MemoryUpdate = str
    GatImpl = str
    ExportFormat = str
    BackendName = str
    ReaderPool = str
    HeatmapValue = str
else:
    Preset = Literal[PRESETS]
    ModelName = Literal[MODELS]
    MemoryUpdate = Literal[MEMORY_UPDATES]
    GatImpl = Literal[GAT_IMPLS]
    ExportFormat = Literal[FORMATS]
    BackendName = Literal[BACKENDS]
    ReaderPool = Literal[POOLS]
    HeatmapValue = Literal[tuple(HEATMAP_VALUES)]
