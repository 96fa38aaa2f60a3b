"""Python's garbage collector around a run's heavy imports.

``run.py`` pauses the collector (``gc.disable()``) before anything heavy is imported;
:func:`gc_after_imports` starts it again once a run's imports are done (:mod:`mchad.task`), or
as a sweep starts (:class:`mchad.sweeps.sweep.SweepReport`: on Ray or SLURM the sweep's driver
runs no trial itself). Where the heavy imports come later, in a process whose collector runs (a
sweep's first trial, a Ray or submitit worker, the Ray launcher's data preparation),
:func:`import_heavy` pauses it for them. Imported before torch: no heavy imports here.
"""

from __future__ import annotations

import gc
import importlib
import sys


def gc_after_imports() -> None:
    """Start Python's garbage collector again, with everything the imports made frozen.

    ``run.py`` pauses the collector: torch, Lightning, torchvision and Hydra leave about 485,000
    long-lived objects, and each full collection walks all of them, while they are imported
    and then all through the run. Frozen (``gc.freeze``), they are left out of every later
    collection. Measured on 2 cores, in runs alternating with the code before: the
    quick-start (``python run.py``) took 16.0-17.0 s of CPU and 12.6-13.0 s of wall time
    before, 14.3-14.4 s and 10.7-10.8 s after; its start-up to the first training step
    (``python -m mchad.bench --only startup``, median of 5) 4.14-4.22 s before, 3.28-3.62 s
    after. Does nothing where the collector runs (not started by ``run.py``: a test, a Ray or
    submitit worker), whose garbage a freeze would keep for good.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def import_heavy(module: str) -> None:
    """Import ``module`` (it imports torch and Lightning) with the collector paused, then start it
    again with what the imports made frozen (:func:`gc_after_imports`).

    Where the collector runs, it first collects, so that no garbage of before is frozen. In a
    sweep, trials imported Lightning with the collector running: measured on 2 cores, ``import
    pytorch_lightning, torchvision`` took 5.3-5.5 s of CPU with it running and 4.3-4.5 s paused. Once
    ``module`` is imported: only :func:`gc_after_imports`.
    """
    if module not in sys.modules:
        if gc.isenabled():
            gc.collect()
            gc.disable()
        importlib.import_module(module)
    gc_after_imports()
