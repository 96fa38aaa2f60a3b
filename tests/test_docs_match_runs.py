"""What README.md and docs/results.md show of a run's results is what a real run writes (issue 32):
one short quick-start run; its open-set and OpenOOD counterparts are checked on the runs of
tests/test_openset.py and tests/test_openood.py."""

from __future__ import annotations

import pandas as pd
from conftest import compose_config
from test_docs import documented_result_columns, readme_example_header
from test_robustness import SHORT, _light_overrides

from mchad.runs.train import run


def test_documented_columns_and_readme_example_are_a_real_runs(tmp_path, caplog):
    cfg = compose_config([*SHORT, "trainer.max_epochs=1", "trainer.min_epochs=1", *_light_overrides()], tmp_path)
    with caplog.at_level("INFO", logger="mchad.runs.train"):
        frame = pd.read_csv(run(cfg))
    (console,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Results: ")]
    assert console.splitlines()[1].split() == list(frame.columns)  # the console prints results.csv
    assert documented_result_columns() == list(frame.columns)
    assert readme_example_header() == list(frame.columns)
