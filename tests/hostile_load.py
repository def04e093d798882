"""A load function that hangs on slides named ``*stuck*``, for ``tests/test_infer_hostile_compute.py``: kept in
its own light module so that a spawned reader process unpickles it without importing the test module (the CLI,
typer, ...), which would eat the slide's time budget."""

from __future__ import annotations

import threading

from momkd.data.batch import GraphSlide
from momkd.runtime.discover import SlideFile
from momkd.runtime.reader import ReaderConfig, SlideFailure, load_one

RELEASE = threading.Event()   # threads: the test releases the hung read; a process is killed by the reader


def stuck_load(file: SlideFile, cfg: ReaderConfig) -> GraphSlide | SlideFailure:
    """``load_one``, except that a slide whose id contains ``stuck`` first waits (up to 120 s) for RELEASE."""
    if "stuck" in file.slide_id:
        RELEASE.wait(120)
    return load_one(file, cfg)
