"""Fetch and check everything that experiments need, before their runs (issue 40).

    python -m mchad.data.prepare experiment=cifar10-mchad [experiment=cifar10-gmchad ...] [overrides...]
    python -m mchad.data.prepare --offline experiment=cifar10-mchad dataset_dir=/data   # check only

For every experiment (its config composed as ``python run.py <overrides>`` would, ``experiment=a,b``
meaning both) this loads each data set the run would load: the ID sets, the OOD test sets, the
outliers, OpenOOD's image lists and images, and the pretrained checkpoint where the run starts
from one. Loading fetches what is missing with the libraries' downloaders and checksums (their
progress bars), one process at a time (:mod:`mchad.data.fetch`), and builds the decoded caches
in ``<dataset_dir>/cache/``; then the runs need no network. It ends with a table (data set,
images, files, size, checksum) and exits 1 with one line per missing data set (what, where, how
to get it) if anything is missing. ``--offline`` uses no network: it only checks.

A sweep's driver does the same once before its trials start (:func:`prepare_sweep`, called by
the Ray launcher; ``+hydra.launcher.prepare_data=false`` turns it off), and bash/run-*.sh run
this command before their sweeps. A swept override (``seed=1,2``, ``split=0,1``) is composed
with its first value, except ``experiment``, ``dataset_dir``, ``openood_dir`` and the data config
groups (``datamodule``, ``testmodules``), whose every value is prepared.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig

from mchad.errors import ConfigError, DataNotFoundError, UserError, first_line

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
#: swept keys whose every value is prepared (the others: their first value)
DATA_KEYS = ("experiment", "dataset_dir", "openood_dir", "datamodule", "testmodules", "osr")


@dataclass
class Row:
    """One line of the table: a data set as a run loads it."""

    dataset: str
    role: str
    #: the data set the row belongs to (its splits share it): one missing line per group
    group: str = ""
    images: int | None = None
    files: int = 0
    size: int = 0
    #: the library's checksums of its files: True, False, None = none known (generated, image folders)
    checksum: bool | None = None
    error: str | None = None


# ----------------------------------------------------------------------------- what runs need


def expand(overrides: list[str]) -> list[list[str]]:
    """The override lists to compose: one per combination of the swept data keys' values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    choices = []
    for text in overrides:
        override = parser.parse_override(text)
        if not override.is_sweep_override():
            choices.append([text])
            continue
        key = override.get_key_element()
        values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        data = key.lstrip("+~").split("/")[0].split(".")[0] in DATA_KEYS
        choices.append(values if data else values[:1])
    return [list(combination) for combination in itertools.product(*choices)]


def compose(overrides: list[str]) -> DictConfig:
    """config/train.yaml composed with ``overrides`` (the job's config, as a run sees it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import mchad  # noqa: F401 (the config resolvers)
    from mchad.targets import VERSION_BASE_KWARGS

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "config"), **VERSION_BASE_KWARGS):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def data_sources(cfg: DictConfig) -> list[tuple[str, object, Path]]:
    """``(role, source, dataset_dir)`` of every data set the run of ``cfg`` loads."""
    from mchad.targets import allowed_patterns, check_targets, instantiate

    check_targets(cfg)
    try:
        datamodule = instantiate(cfg.datamodule, allowed_patterns(cfg))
    except Exception as error:  # Hydra 1.3 wraps the constructor's error: the user's mistake, unwrapped
        cause = error
        while not isinstance(cause, UserError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from error
        raise ConfigError(f"datamodule: {first_line(cause)}") from error
    found = [(f"id/{split}", source) for split, source in datamodule.sources.items()]
    found += [("id/val", datamodule.val_source), ("val/unknowns", datamodule.val_unknown_source)]
    found += [(f"ood/{name}", source) for name, source in datamodule.test_case_sources.items()]
    found.append(("outliers", datamodule.outlier_source))
    return [(role, source, datamodule.dataset_dir) for role, source in found if source is not None]


def _key(source, dataset_dir: Path) -> str:
    """The same data set loaded the same way (two experiments' CIFAR-10 training set): prepared once."""
    from mchad.data.sources import Source

    parts = sorted((k, _key(v, dataset_dir) if isinstance(v, Source) else repr(v)) for k, v in vars(source).items())
    return repr((type(source).__name__, parts, str(dataset_dir)))


def _offline(source) -> None:
    for part in (source, getattr(source, "source", None)):
        if part is not None and hasattr(part, "download"):
            part.download = False


# ----------------------------------------------------------------------------- preparing one


def library_files(source, dataset_dir: Path) -> dict[str, str | None]:
    """The files a library keeps for ``source`` in ``dataset_dir`` (relative) and their MD5 sums."""
    from mchad.data import fetch
    from mchad.data.sources import PytorchOODSource, TinyImageNetSource, TinyImages300kSource

    source = getattr(source, "source", source)  # ClassSubset
    if hasattr(source, "library_files"):
        return source.library_files()
    if isinstance(source, PytorchOODSource):
        import pytorch_ood.dataset.img as datasets

        return fetch.library_files(getattr(datasets, source.name, None))
    if isinstance(source, TinyImageNetSource | TinyImages300kSource):
        import pytorch_ood.dataset.img as datasets

        return fetch.library_files(getattr(datasets, source.name.split("/")[0]))
    return {}


def prepare_source(role: str, source, dataset_dir: Path, offline: bool) -> Row:
    """Load ``source`` as a run would (fetching it and building its cache); its row."""
    from mchad.data.fetch import checksums_ok

    name, split = source.describe(), getattr(getattr(source, "source", source), "split", None)
    name += f" ({split})" if isinstance(split, str) and split not in name else ""
    if offline:
        _offline(source)
    row = Row(name, role, getattr(getattr(source, "source", source), "name", name))
    try:
        row.images = len(source.load(dataset_dir))
    except UserError as error:
        row.error = str(error).strip().splitlines()[0]  # whole: its end says how to get the data
    files = {f: md5 for f, md5 in library_files(source, dataset_dir).items() if (dataset_dir / f).is_file()}
    row.files = len(files)
    row.size = sum((dataset_dir / f).stat().st_size for f in files)
    row.checksum = checksums_ok(dataset_dir, files) if files else None
    return row


def checkpoint_row(cfg: DictConfig, offline: bool) -> Row | None:
    """The pretrained checkpoint the run starts from (``model.pretrained_checkpoint``), fetched
    from pytorch-ood's registry (torch.hub, hash-checked) when it names a model there."""
    name = cfg.model.get("pretrained_checkpoint") if "model" in cfg else None
    if not name:
        return None
    row = Row(f"pretrained checkpoint {name}", "model")
    path = Path(str(name)).expanduser()
    if path.is_file():
        row.files, row.size = 1, path.stat().st_size
        return row
    try:
        from pytorch_ood.model import get_model_info

        entry = get_model_info(str(name))
    except (ImportError, ValueError):
        row.error = (
            f"pretrained checkpoint {name} not found: put the file there or give its path "
            "(model.pretrained_checkpoint=/path; the published runs' file: github.com/hendrycks/pre-training)"
        )
        return row
    row.error = _hub_fetch(entry, offline)
    target = Path(_hub_dir()) / "checkpoints" / entry.file_name
    if target.is_file():
        row.files, row.size = 1, target.stat().st_size
    return row


def _hub_dir() -> str:
    import torch

    return torch.hub.get_dir()


def _hub_fetch(entry, offline: bool) -> str | None:
    import torch

    from mchad.data.fetch import locked

    folder = Path(_hub_dir()) / "checkpoints"
    how = f"download {entry.url} where there is internet and pass the file: model.pretrained_checkpoint=/path/to/it"
    if (folder / entry.file_name).is_file():
        return None
    if offline:
        return f"pretrained checkpoint {entry.file_name} not in {folder} (offline); {how}"
    match = torch.hub.HASH_REGEX.search(entry.file_name)  # the hash prefix torch.hub checks (check_hash=True)
    try:
        with locked(folder, entry.file_name):  # torch.hub writes a temporary file, renamed when checked
            if not (folder / entry.file_name).is_file():
                hash_prefix = match.group(1) if match else None
                torch.hub.download_url_to_file(entry.url, str(folder / entry.file_name), hash_prefix=hash_prefix)
    except Exception as error:  # noqa: BLE001 - offline, refused: one line
        return f"pretrained checkpoint {entry.file_name} could not be downloaded ({first_line(error)}); {how}"
    return None


# ----------------------------------------------------------------------------- all of them


def prepare(configs: list[DictConfig], offline: bool = False, say=log.debug, skip_bad: bool = False) -> list[Row]:
    """Prepare every data set (once) and checkpoint the runs of ``configs`` need; their rows.
    ``say``: where the line announcing each data set goes; ``skip_bad``: a config whose data
    module cannot be built is left out (a sweep's trial then reports its own mistake)."""
    rows, seen = [], set()
    for cfg in configs:
        try:
            sources = data_sources(cfg)
        except UserError as error:
            if not skip_bad:
                raise
            say(f"not prepared: {first_line(error)}")
            continue
        for role, source, dataset_dir in sources:
            key = _key(source, dataset_dir)
            if key not in seen:
                seen.add(key)
                say(f"preparing {source.describe()} ({role})")
                rows.append(prepare_source(role, source, Path(dataset_dir), offline))
        row = checkpoint_row(cfg, offline)
        if row is not None and row.dataset not in {r.dataset for r in rows}:
            rows.append(row)
    return rows


def missing_lines(rows: list[Row]) -> list[str]:
    """One line per missing data set (a data set's splits that miss the same way: one line)."""
    lines: dict[str, str] = {}
    for row in rows:
        if row.error:
            lines.setdefault(row.group or row.dataset, row.error)
    return list(lines.values())


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    head = ("data set", "role", "images", "files", "size", "checksum")
    body = [
        (
            r.dataset,
            r.role,
            "MISSING" if r.error else str(r.images),
            str(r.files) if r.files else "-",
            _size(r.size) if r.files else "-",
            {True: "ok", False: "FAILED", None: "-"}[r.checksum],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mchad.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="as for run.py, e.g. experiment=cifar10-mchad dataset_dir=/data")
    parser.add_argument("--offline", action="store_true", help="use no network: only check what is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        configs = [compose(overrides) for overrides in expand(args.overrides)]
        rows = prepare(configs, args.offline, say=lambda line: print(line, file=sys.stderr, flush=True))
    except (UserError, HydraException) as error:  # an input mistake (a data module's check, composing)
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(table(rows), flush=True)
    lines = missing_lines(rows)
    for line in lines:
        print(f"missing: {line}", file=sys.stderr)
    bad = [r.dataset for r in rows if r.checksum is False]
    for name in bad:
        print(f"checksum failed: {name} (delete its files and prepare again)", file=sys.stderr)
    return 1 if lines or bad else 0


def prepare_sweep(launcher, job_overrides) -> None:
    """The sweep driver's preparation (the Ray launcher calls it before it starts any trial):
    every data set of every trial once; DataNotFoundError naming what is missing."""
    from omegaconf import OmegaConf

    configs = []
    for overrides in job_overrides:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        configs.append(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))  # the task's config
    data_log = logging.getLogger("mchad.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)  # the sweep's console: one line per trial; downloads show their bars
    try:
        rows = prepare(configs, skip_bad=True)
    finally:
        data_log.setLevel(level)
    lines = missing_lines(rows)
    if lines:
        more = (
            f" (and {len(lines) - 1} more data set(s): python -m mchad.data.prepare lists them)"
            if len(lines) > 1
            else ""
        )
        raise DataNotFoundError(f"no trial started: {lines[0]}{more}")
    log.debug("sweep data ready: %d data set(s)", len(rows))


if __name__ == "__main__":
    raise SystemExit(main())
