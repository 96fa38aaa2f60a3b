"""On a GPU, during section (a): its utilisation while the timed steps run and the host
synchronisations per training step."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time

from mchad.bench.common import REPO, lightning_trainer


# --- (a) GPU utilisation, sampled while the timed steps run----------------------------------------
def nvidia_smi_id(index: int) -> str:
    """nvidia-smi's ``-i`` for torch's CUDA device ``index``: nvidia-smi counts every GPU of the
    machine, torch only those in ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, both of which
    ``-i`` accepts)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


class UtilisationSampler:
    """GPU utilisation (% of the time a kernel ran, as nvidia-smi reports it), sampled every
    ``interval`` seconds in a background thread between ``start()`` and ``stop()`` (or as a
    context manager); ``samples`` holds ``(epoch seconds, percent)``.

    ``reader``: ``nvml`` (``torch.cuda.utilization``, needs pynvml / nvidia-ml-py: in-process,
    cheap), ``nvidia-smi`` (one ``nvidia-smi --query-gpu`` process per sample: each sample's time
    is known; a ``-lms`` loop would buffer its output in a pipe), or ``auto`` (nvml if pynvml is
    importable, else nvidia-smi). ``index=None`` (no GPU) samples nothing; ``unavailable`` then
    says why, as it does when no reader works.
    """

    def __init__(self, index: int | None, interval: float = 0.1, reader: str = "auto"):
        import importlib.util

        self.index, self.interval = index, interval
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.unavailable: str | None = None
        self.reader = reader
        if reader == "auto":
            self.reader = "nvml" if importlib.util.find_spec("pynvml") is not None else "nvidia-smi"
        self._smi = shutil.which("nvidia-smi") if self.reader == "nvidia-smi" else None
        if index is None:
            self.unavailable = "n/a (no GPU)"
        elif self.reader == "nvidia-smi" and self._smi is None:
            self.unavailable = "n/a (no nvidia-smi)"
        self._thread = None

    def read(self) -> float:
        if self.reader == "nvml":
            import torch

            return float(torch.cuda.utilization(self.index))
        proc = subprocess.run(
            [
                self._smi,
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-i",
                nvidia_smi_id(self.index),
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        lines = proc.stdout.split()
        if proc.returncode or not lines:
            raise RuntimeError(f"nvidia-smi exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}")
        return float(lines[0])

    def _run(self) -> None:
        while True:
            before = time.time()
            try:
                value = self.read()
            except Exception as error:  # noqa: BLE001  (a failed sample is skipped and reported)
                self.errors.append(str(error))
            else:
                self.samples.append(((before + time.time()) / 2, value))
            if self._stop.wait(self.interval):
                return

    def start(self) -> UtilisationSampler:
        import threading

        if self.unavailable is None and self.reader == "nvml":
            try:
                self.read()
            except Exception as error:  # noqa: BLE001  (e.g. NVML not initialised: nvidia-smi may still work)
                self._smi = shutil.which("nvidia-smi")
                self.reader = "nvidia-smi" if self._smi else "nvml"
                if self._smi is None:
                    self.unavailable = f"n/a (nvml failed: {error}; no nvidia-smi)"
        if self.unavailable is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="gpu-utilisation", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.unavailable is None and not self.samples and self.errors:
            self.unavailable = f"n/a ({self.reader} failed: {self.errors[-1]})"

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def values(self, windows: list[tuple[float, float]] | None = None) -> list[float]:
        """The percentages sampled inside any of ``windows`` (all with None)."""
        return [v for t, v in self.samples if windows is None or any(a <= t <= b for a, b in windows)]

    def median(self, windows: list[tuple[float, float]] | None = None) -> float | None:
        values = self.values(windows)
        return statistics.median(values) if values else None

    def describe(self, windows: list[tuple[float, float]] | None = None) -> str:
        """``median 27 % (n=70, nvidia-smi every 0.1 s)`` or why there is no figure."""
        values = self.values(windows)
        if self.unavailable or not values:
            return self.unavailable or "n/a (no sample inside the timed steps)"
        return f"median {statistics.median(values):.0f} % (n={len(values)}, {self.reader} every {self.interval:g} s)"


# --- (a) host synchronisations per training step (CUDA) -----------------------------------------------
def sync_counter(first: int, steps: int, set_mode=None):
    """A callback that counts the host synchronisations of training steps ``first`` to
    ``first + steps - 1`` with ``torch.cuda.set_sync_debug_mode("warn")`` (``set_mode``: that
    function; the tests pass a stand-in). A step runs from its batch's start to the next one's,
    so that Lightning's logging after ``on_train_batch_end`` counts: the trainer must run
    ``first + steps + 1`` batches."""
    import collections
    import warnings

    import pytorch_lightning as pl

    if set_mode is None:
        import torch

        set_mode = torch.cuda.set_sync_debug_mode

    class SyncCounter(pl.Callback):
        def __init__(self) -> None:
            self.per_step: list[int] = []
            self.logging_steps: list[int] = []
            self.locations: collections.Counter = collections.Counter()
            self._catcher = None
            self._count = 0

        def _record(self, message, category, filename, lineno, file=None, line=None):
            # torch's message: "called a synchronizing CUDA operation"; other warnings do not count
            if "synchroniz" not in str(message):
                return
            self._count += 1
            self.locations[_sync_location(filename, lineno)] += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first:
                self._catcher = warnings.catch_warnings()
                self._catcher.__enter__()
                warnings.simplefilter("always")  # every occurrence, not once per location
                warnings.showwarning = self._record
                set_mode("warn")
            elif first < batch_idx <= first + steps and self._catcher is not None:
                self.per_step.append(self._count)
                self._count = 0
                if batch_idx == first + steps:
                    self._finish()
            if first <= batch_idx < first + steps:
                # Lightning logs when (steps done + 1) % log_every_n_steps == 0 (one optimizer)
                if trainer.log_every_n_steps and (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
                    self.logging_steps.append(batch_idx - first)

        def _finish(self) -> None:
            set_mode(0)
            self._catcher.__exit__(None, None, None)
            self._catcher = None

        def on_train_end(self, trainer, pl_module):  # fewer batches than asked: close anyway
            if self._catcher is not None:
                self._finish()

    return SyncCounter()


def _sync_location(filename: str, lineno: int) -> str:
    """``file:line`` of a synchronisation, and the line of this package's code that led there
    (called from the counter's warning hook: the last two frames are the hook's and this one)."""
    import traceback

    ours = [f for f in traceback.extract_stack()[:-2] if "/src/mchad/" in f.filename]
    where = f"{short_path(filename)}:{lineno}"
    if ours and ours[-1].filename != filename:
        where += f" (from {short_path(ours[-1].filename)}:{ours[-1].lineno})"
    return where


def short_path(filename: str) -> str:
    """A source file's path from the repository or from site-packages."""
    for anchor in (str(REPO) + os.sep, "site-packages" + os.sep, "dist-packages" + os.sep):
        if anchor in filename:
            return filename.split(anchor, 1)[1]
    return filename


def host_syncs(cfg, warmup: int, steps: int, set_mode=None):
    """Train ``warmup`` steps, then count the host synchronisations of ``steps`` more."""
    import pytorch_lightning as pl

    from mchad.runs.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    counter = sync_counter(warmup, steps, set_mode)
    trainer = lightning_trainer(cfg, warmup + steps + 1, [counter])
    trainer.fit(model, datamodule=datamodule)
    return counter
