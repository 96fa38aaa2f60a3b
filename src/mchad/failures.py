"""A failed run's or trial's cause in ``<run folder>/FAILED.txt``, read back by the sweep report
and ``mchad.results.aggregate``."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from mchad.errors import UserError, one_line

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED.txt"
RESULTS_FILE = "results.csv"


def record_failure(output_dir: str | Path, error: BaseException | str) -> str:
    """Write the cause of a failed run to ``<output_dir>/FAILED.txt`` (a bug's traceback below
    it) and return the cause in one line. A folder that holds a results.csv (a finished run
    whose resume was refused) is left as it is."""
    output_dir = Path(output_dir)
    cause = one_line(error)
    if (output_dir / RESULTS_FILE).exists():
        return cause
    detail = "" if isinstance(error, (str, UserError)) else "\n" + "".join(traceback.format_exception(error))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FAILED_FILE).write_text(f"error: {cause}\n{detail}", encoding="utf-8")
    except OSError as write_error:  # e.g. a read-only run folder: the console has the cause
        log.warning("could not write %s: %s", output_dir / FAILED_FILE, write_error)
    return cause


def failure_cause(run_dir: Path, missing: str = "unknown cause") -> str:
    """First line of the run's FAILED.txt without its ``error:`` prefix; ``missing`` when
    there is no such file (the aggregation: a run not finished is not necessarily failed)."""
    try:
        lines = (run_dir / FAILED_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return missing
    return lines[0].removeprefix("error: ").strip() if lines else "unknown cause"
