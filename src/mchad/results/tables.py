"""Paper-form tables of aggregated results: one ``mean ± spread`` cell per metric.

``mchad.results.aggregate`` computes the statistics (over seeds) and the Welch tests; this module
only lays them out, as LaTeX (booktabs) and Markdown:

* rows are methods grouped by ID dataset; order, display names and the OOD score each
  method is shown with come from the method registry (:mod:`mchad.registry`), unless the table
  config (``tables.yaml`` next to this module, or another via ``load_table_config(path)``) lists them;
* the best value per column and dataset is bold (highest; lowest for FPR95), compared at
  the printed precision so that ties are all bold;
* a dagger marks a method whose per-seed values differ from the baseline's (MCHAD) by
  Welch's t-test at ``p < alpha``;
* the caption names the seeds, the score and what ``±`` is (sem or std over seeds).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mchad import registry

# Column names shared with mchad.results.aggregate's tables.
DATASET, MODEL, OOD_SET = "Dataset", "Model", "OOD set"
SCORE, SEEDS, SEED_LIST = "Score", "Seeds", "Seed list"
METRIC, P_VALUE = "Metric", "p"

DEFAULT_CONFIG = Path(__file__).with_name("tables.yaml")
LOWER_IS_BETTER = frozenset({"FPR95"})
SPREADS = ("sem", "std")


class TableConfigError(ValueError):
    """The table configuration file is missing or malformed."""


@dataclass(frozen=True)
class MethodStyle:
    method: str  # as results.csv names it
    name: str  # as the table prints it
    score: str | None  # OOD score shown; None: the run's headline score


@dataclass(frozen=True)
class TableConfig:
    methods: tuple[MethodStyle, ...]
    baseline: str
    datasets: tuple[str, ...]
    ood_sets: tuple[str, ...]

    @property
    def method_order(self) -> list[str]:
        return [m.method for m in self.methods]

    def display_name(self, method: str) -> str:
        return next((m.name for m in self.methods if m.method == method), method)

    def scores(self) -> dict[str, str]:
        """method -> configured score (methods without one use their headline score)."""
        return {m.method: m.score for m in self.methods if m.score}


def load_table_config(path: str | Path | None = None) -> TableConfig:
    """Read the table configuration (default: ``tables.yaml`` next to this module)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError as exc:
        raise TableConfigError(f"no such table config: {path}") from exc
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        raise TableConfigError(f"{path}: unreadable ({' '.join(str(exc).split())})") from exc
    if not isinstance(raw, DictConfig):
        raise TableConfigError(f"{path}: expected a mapping with methods, baseline, datasets, ood_sets")
    unknown = sorted(set(raw.keys()) - {"methods", "baseline", "datasets", "ood_sets"})
    if unknown:
        raise TableConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}")

    methods = []
    # without its own list, the method registry's rows (src/mchad/registry/methods.yaml)
    listed = raw.get("methods") if "methods" in raw else OmegaConf.create(registry.table_methods())
    for entry in _string_list_or_mappings(listed, path, "methods"):
        entry = {"method": entry} if isinstance(entry, str) else entry
        if not entry.get("method"):
            raise TableConfigError(f"{path}: every entry of methods needs a 'method'")
        extra = sorted(set(entry) - {"method", "name", "score"})
        if extra:
            raise TableConfigError(f"{path}: unknown key(s) {', '.join(extra)} in methods entry {entry['method']}")
        methods.append(
            MethodStyle(
                str(entry["method"]),
                str(entry.get("name") or entry["method"]),
                str(entry["score"]) if entry.get("score") else None,
            )
        )
    names = [m.method for m in methods]
    if len(set(names)) != len(names):
        raise TableConfigError(f"{path}: a method is listed twice in methods")
    return TableConfig(
        methods=tuple(methods),
        baseline=str(raw.get("baseline", "MCHAD")),
        datasets=tuple(map(str, _string_list_or_mappings(raw.get("datasets"), path, "datasets"))),
        ood_sets=tuple(map(str, _string_list_or_mappings(raw.get("ood_sets"), path, "ood_sets"))),
    )


def _string_list_or_mappings(value: object, path: Path, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, ListConfig):
        raise TableConfigError(f"{path}: '{key}' must be a list")
    return OmegaConf.to_container(value)


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """``values`` in the order of ``preferred``; the others follow alphabetically."""
    present = set(values)
    return [v for v in preferred if v in present] + sorted(present - set(preferred))


# ----------------------------------------------------------------------------- layout


@dataclass
class Cell:
    mean: float
    spread: float  # nan with a single seed
    best: bool = False
    significant: bool = False


@dataclass
class PaperTable:
    """A laid-out table: row groups by dataset, one Cell (or None: no result) per column."""

    columns: list[str]
    higher_is_better: list[bool]
    rows: list[tuple[str, str]]  # (dataset, display name)
    cells: list[list[Cell | None]]
    caption: list[str]  # sentences; rendered with each format's symbols
    decimals: int
    label: str
    show_arrows: bool  # arrows in the header (metrics as columns)


@dataclass(frozen=True)
class TableOptions:
    spread: str = "sem"  # "sem" or "std" over seeds
    alpha: float = 0.05  # significance threshold of the Welch tests
    decimals: int = 2


def paper_table(
    summary: pd.DataFrame,
    welch: pd.DataFrame,
    metrics: Sequence[str],
    config: TableConfig,
    options: TableOptions = TableOptions(),
) -> PaperTable:
    """The main table: metrics as columns (each seed's value averaged over the OOD sets)."""
    long = [
        _long_row(record, metric, record[f"{metric} mean"], record[f"{metric} {options.spread}"])
        for record in summary.to_dict("records")
        for metric in metrics
    ]
    p_values = _p_values(welch, [METRIC])
    caption = _seed_sentences(
        f"{', '.join(metrics)} in {{percent}}",
        summary,
        config,
        options,
        ", each seed's value being its mean over the OOD sets",
    )
    return _layout(
        long,
        list(metrics),
        [m not in LOWER_IS_BETTER for m in metrics],
        p_values,
        config,
        options,
        caption,
        summary,
        label="tab:aggregate",
        show_arrows=True,
    )


def per_ood_paper_table(
    summary_per_ood: pd.DataFrame,
    welch_per_ood: pd.DataFrame,
    metric: str,
    config: TableConfig,
    options: TableOptions = TableOptions(),
) -> PaperTable:
    """One metric, OOD sets as columns (over seeds per OOD set)."""
    long = [
        _long_row(record, record[OOD_SET], record[f"{metric} mean"], record[f"{metric} {options.spread}"])
        for record in summary_per_ood.to_dict("records")
    ]
    columns = ordered((row["column"] for row in long), config.ood_sets)
    welch_metric = welch_per_ood[welch_per_ood[METRIC] == metric] if not welch_per_ood.empty else welch_per_ood
    p_values = _p_values(welch_metric, [OOD_SET])
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    caption = _seed_sentences(
        f"{metric} in {{percent}} per OOD set ({direction} is better)", summary_per_ood, config, options
    )
    return _layout(
        long,
        columns,
        [metric not in LOWER_IS_BETTER] * len(columns),
        p_values,
        config,
        options,
        caption,
        summary_per_ood,
        label=f"tab:per-ood-{_label_name(metric)}",
        show_arrows=False,
    )


def _long_row(record: Mapping, column: str, mean: float, spread: float) -> dict:
    return {"dataset": record[DATASET], "method": record[MODEL], "column": column, "mean": mean, "spread": spread}


def _p_values(welch: pd.DataFrame, column_keys: list[str]) -> dict[tuple, float]:
    if welch.empty:
        return {}
    keys = [DATASET, MODEL] + column_keys
    return {tuple(row[k] for k in keys): row[P_VALUE] for row in welch.to_dict("records")}


def _layout(long, columns, higher_is_better, p_values, config, options, caption, summary, label, show_arrows):
    frame = pd.DataFrame(long, columns=["dataset", "method", "column", "mean", "spread"])
    datasets = ordered(frame["dataset"], config.datasets)
    rows, cells = [], []
    for dataset in datasets:
        of_dataset = frame[frame["dataset"] == dataset]
        for method in ordered(of_dataset["method"], config.method_order):
            of_method = of_dataset[of_dataset["method"] == method].set_index("column")
            row = []
            for column in columns:
                if column not in of_method.index or not math.isfinite(of_method.at[column, "mean"]):
                    row.append(None)
                    continue
                p = p_values.get((dataset, method, column), math.nan)
                significant = method != config.baseline and math.isfinite(p) and p < options.alpha
                row.append(
                    Cell(
                        float(of_method.at[column, "mean"]),
                        float(of_method.at[column, "spread"]),
                        significant=significant,
                    )
                )
            rows.append((dataset, config.display_name(method)))
            cells.append(row)
    _mark_best(rows, cells, higher_is_better, options.decimals)

    tested = any(math.isfinite(p) for p in p_values.values())
    caption = caption + [
        _score_phrase(summary, config),
        "best per column and dataset in bold" + ("" if all(higher_is_better) else " (lowest for FPR95)"),
    ]
    if tested:
        caption.append(
            f"{{dagger}}: differs from {config.display_name(config.baseline)} at p < {options.alpha:g} "
            "(Welch's t-test over seeds)"
        )
    return PaperTable(columns, higher_is_better, rows, cells, caption, options.decimals, label, show_arrows)


def _mark_best(rows, cells, higher_is_better, decimals) -> None:
    """Bold the best printed value per column within each dataset (all of them on a tie)."""
    for dataset in dict.fromkeys(d for d, _ in rows):
        group = [cells[i] for i, (d, _) in enumerate(rows) if d == dataset]
        for j, higher in enumerate(higher_is_better):
            present = [row[j] for row in group if row[j] is not None]
            if len(present) < 2:
                continue
            printed = [round(c.mean, decimals) for c in present]
            best = max(printed) if higher else min(printed)
            for cell, value in zip(present, printed, strict=True):
                cell.best = value == best


def _seed_sentences(
    what_is_shown: str, summary: pd.DataFrame, config: TableConfig, options: TableOptions, per_seed: str = ""
) -> list[str]:
    spread = "standard error of the mean" if options.spread == "sem" else "standard deviation (ddof=1)"
    seeds_by_method: dict[tuple[str, str], set[int]] = {}
    for record in summary.to_dict("records"):
        key = (record[DATASET], record[MODEL])
        seeds_by_method.setdefault(key, set()).update(_seed_values(record[SEED_LIST]))
    all_seeds = set().union(*seeds_by_method.values()) if seeds_by_method else set()
    sentences = [
        f"{what_is_shown}: mean {{pm}} {spread} over {len(all_seeds)} seeds ({_seed_text(all_seeds)})" + per_seed
    ]
    fewer = [
        f"{config.display_name(method)} on {dataset} ({_seed_text(seeds)})"
        for (dataset, method), seeds in seeds_by_method.items()
        if seeds != all_seeds
    ]
    if fewer:
        sentences.append("fewer seeds for " + ", ".join(fewer))
    if any(len(s) < 2 for s in seeds_by_method.values()):
        sentences.append("{nospread}: a single seed, no spread")
    return sentences


def _seed_values(text: object) -> list[int]:
    # the summary's Seed list is "1 2 3"; a CSV round trip may turn a single seed into an int
    return [int(s) for s in str(text).split()]


def _seed_text(seeds: Iterable[int]) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def _score_phrase(summary: pd.DataFrame, config: TableConfig) -> str:
    by_score: dict[str, list[str]] = {}
    for record in summary.drop_duplicates([MODEL, SCORE]).to_dict("records"):
        by_score.setdefault(str(record[SCORE]), []).append(config.display_name(record[MODEL]))
    if not by_score:
        return "OOD score: none"
    common = max(by_score, key=lambda s: len(by_score[s]))
    others = [f"{score} for {', '.join(names)}" for score, names in by_score.items() if score != common]
    return f"OOD score: {common}" + (f" ({'; '.join(others)})" if others else "")


def _label_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------- rendering


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class _Markup:
    """How one output format writes the parts of a table."""

    cell_pm: str  # between mean and spread in a cell
    nospread: str  # spread of a single seed
    missing: str  # a cell without result
    bold: str  # format of a best cell's body
    marker: str  # significance marker after the body
    wrap: str  # format of a whole cell
    arrows: dict[bool, str]  # header suffix by higher_is_better
    symbols: dict[str, str]  # caption placeholders: pm, dagger, percent, nospread
    escape: Callable[[str], str]

    def cell(self, cell: Cell | None, decimals: int) -> str:
        if cell is None:
            return self.missing
        spread = self.nospread if math.isnan(cell.spread) else _number(cell.spread, decimals)
        body = f"{_number(cell.mean, decimals)}{self.cell_pm}{spread}"
        body = self.bold.format(body) if cell.best else body
        return self.wrap.format(body + (self.marker if cell.significant else ""))

    def header(self, table: PaperTable) -> list[str]:
        return [DATASET, "Method"] + [
            self.escape(c) + (self.arrows[h] if table.show_arrows else "")
            for c, h in zip(table.columns, table.higher_is_better, strict=True)
        ]

    def body(self, table: PaperTable) -> list[list[str]]:
        """Cells per row; the dataset named on the first row of its group only."""
        rows, previous = [], None
        for (dataset, name), row in zip(table.rows, table.cells, strict=True):
            first = self.escape(dataset) if dataset != previous else ""
            rows.append([first, self.escape(name)] + [self.cell(c, table.decimals) for c in row])
            previous = dataset
        return rows

    def caption(self, table: PaperTable) -> str:
        # Sentences carry {pm} etc. placeholders; the free text (names) is escaped.
        sentences = []
        for sentence in table.caption:
            parts = re.split(r"\{(pm|dagger|percent|nospread)\}", sentence)
            # re.split with a group: odd positions are the placeholder names
            sentences.append("".join(self.symbols[p] if i % 2 else self.escape(p) for i, p in enumerate(parts)))
        return ". ".join(s[0].upper() + s[1:] for s in sentences if s) + "."


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


MARKDOWN = _Markup(
    cell_pm=" ± ",
    nospread="–",
    missing="–",
    bold="**{}**",
    marker=" †",
    wrap="{}",
    arrows={True: " ↑", False: " ↓"},
    symbols={"pm": "±", "dagger": "†", "percent": "%", "nospread": "–"},
    escape=str,
)
LATEX = _Markup(
    cell_pm=" \\pm ",
    nospread="\\mbox{--}",
    missing="--",
    bold="\\mathbf{{{}}}",
    marker="^{\\dagger}",
    wrap="${}$",
    arrows={True: " $\\uparrow$", False: " $\\downarrow$"},
    symbols={"pm": "$\\pm$", "dagger": "$^\\dagger$", "percent": "\\%", "nospread": "--"},
    escape=latex_escape,
)


def render_markdown(table: PaperTable) -> str:
    """GitHub-flavoured Markdown, with the caption as a pandoc ``Table:`` line below."""
    frame = pd.DataFrame(MARKDOWN.body(table), columns=MARKDOWN.header(table))
    text = to_markdown(frame, [False, False] + [True] * len(table.columns))
    return text + f"\nTable: {MARKDOWN.caption(table)}\n"


def render_latex(table: PaperTable) -> str:
    """A ``table`` float with a booktabs ``tabular``; needs ``\\usepackage{booktabs}``."""
    lines = [
        "% written by python -m mchad.results.aggregate; needs \\usepackage{booktabs}",
        "\\begin{table}[htbp]",
        "\\centering",
        f"\\caption{{{LATEX.caption(table)}}}",
        f"\\label{{{table.label}}}",
        # seven "mean ± spread" columns are about 415 pt wide even so: a two-column paper needs table*
        "\\small",
        "\\setlength{\\tabcolsep}{4pt}",
        f"\\begin{{tabular}}{{ll{'c' * len(table.columns)}}}",
        "\\toprule",
        " & ".join(LATEX.header(table)) + " \\\\",
    ]
    for row in LATEX.body(table):
        if row[0]:
            lines.append("\\midrule")
        lines.append(" & ".join(row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def to_markdown(table: pd.DataFrame, right_align: list[bool] | None = None) -> str:
    """Render a (string) DataFrame as a GitHub-flavoured Markdown table."""
    headers = [str(c) for c in table.columns]
    cells = [[str(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    right_align = right_align or [False] * len(headers)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right_align, strict=True)]
        return "| " + " | ".join(padded) + " |"

    dashes = [("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right_align, strict=True)]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells]) + "\n"


def write_paper_table(table: PaperTable, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Write ``stem``.md and ``stem``.tex."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "tex": out_dir / f"{stem}.tex"}
    paths["md"].write_text(render_markdown(table), encoding="utf-8")
    paths["tex"].write_text(render_latex(table), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- any table: order and files

# Column names of the written tables (display order and names: mchad/results/tables.yaml).
DISPLAY_NAMES = {"id_dataset": DATASET, "method": MODEL, "test_case": OOD_SET}

# p-values can be tiny; two decimals would print them as 0.00.
DEFAULT_FORMATS = {"p": "{:.3g}", "t": "{:.3f}"}


def sort_rows(table: pd.DataFrame, config: TableConfig | None = None) -> pd.DataFrame:
    """``table`` sorted by dataset, model and OOD set in the table config's display order."""
    keys = [c for c in (DATASET, MODEL, OOD_SET) if c in table.columns]
    if table.empty:
        return table.reset_index(drop=True)
    return table.sort_values(keys, key=lambda c: display_order(c, config), kind="stable").reset_index(drop=True)


@functools.cache
def _default_table_config() -> TableConfig:
    return load_table_config()


def display_orders(config: TableConfig | None) -> dict[str, tuple[str, ...] | list[str]]:
    config = config or _default_table_config()
    return {DATASET: config.datasets, MODEL: config.method_order, OOD_SET: config.ood_sets}


def display_order(column: pd.Series, config: TableConfig | None = None) -> pd.Series:
    categories = ordered(column, display_orders(config).get(column.name, []))
    return pd.Series(pd.Categorical(column, categories=categories, ordered=True), index=column.index)


def write_tables(
    table: pd.DataFrame,
    out_dir: str | Path,
    stem: str,
    formats: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``stem``.csv (full precision), .md, .html and .tex (2 decimals) to ``out_dir``.

    ``formats`` maps column names to format strings for the text formats
    (default: floats ``{:.2f}``, plus ``DEFAULT_FORMATS``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _format_cells(table, {**DEFAULT_FORMATS, **(formats or {})})
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in table.columns]

    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "html", "tex")}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(text, numeric), encoding="utf-8")
    paths["html"].write_text(text.to_html(index=False, justify="center", border=0) + "\n", encoding="utf-8")
    column_format = "".join("r" if n else "l" for n in numeric)
    paths["tex"].write_text(text.to_latex(index=False, escape=True, column_format=column_format), encoding="utf-8")
    return paths


def _format_cells(table: pd.DataFrame, formats: Mapping[str, str]) -> pd.DataFrame:
    def format_value(column: str, value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "nan"
        if isinstance(value, (float, np.floating)):
            return formats.get(column, "{:.2f}").format(value)
        return str(value)

    return pd.DataFrame(
        {c: [format_value(c, v) for v in table[c].tolist()] for c in table.columns},
        index=range(len(table)),
        columns=table.columns,
    )


def safe_name(name: str) -> str:
    """``name`` as a file name part (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
