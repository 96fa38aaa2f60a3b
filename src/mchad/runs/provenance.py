"""Where a run's numbers come from: code, libraries, device, data and configuration.

Every run writes ``provenance.json`` next to its ``results.csv`` and adds three columns to
each results row, which ``python -m mchad.results.aggregate`` checks before it averages trials:

* ``code_version``: package version + git commit, with ``.dirty-<hash of the changes>`` when
  the working tree differs from the commit: the diff of tracked files and the content of
  untracked, non-ignored ones (a method in an untracked ``my_methods.py`` is code the run
  imported); ``unknown`` without git or outside a checkout;
* ``data_fingerprint``: a hash of the fingerprints of the data behind the row (ID training
  and test set, outliers, the row's OOD test set; see :func:`mchad.data.sources.data_fingerprint`);
* ``config_hash``: a hash of the resolved configuration without the seed and the run's
  locations and run mode (``paths``, ``dataset_dir``, ``resume``, ``ckpt_path``, ``train``,
  ``trust_checkpoint``).

The JSON file adds the library versions (Python, torch, CUDA, Lightning, pytorch-ood, numpy),
the device, each data set's own fingerprint and the checkpoint a model was loaded from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
PROVENANCE_FILE = "provenance.json"
COLUMNS = ["code_version", "data_fingerprint", "config_hash"]
#: configuration keys that locate or seed a run without changing what it computes
_RUN_KEYS = ("paths", "seed", "dataset_dir", "resume", "ckpt_path", "train", "trust_checkpoint", "hydra")


def _git(args: list[str], cwd: Path) -> bytes | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, hung file system
        return None
    return result.stdout


def code_state(source: Path | None = None) -> dict[str, Any]:
    """The package version and the git state of the code this process imported (``source``:
    the package's folder by default).

    Called when a run starts (the code may be edited while it trains). Without git, or for an
    installed package outside a checkout, the commit is ``unknown``; never raises.
    """
    import mchad

    source = Path(source) if source is not None else Path(mchad.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], source)
    state: dict[str, Any] = {"package_version": mchad.__version__, "git_commit": UNKNOWN, "git_dirty": None}
    if commit is None:
        return state
    state["git_commit"] = commit.decode().strip()
    status = _git(["status", "--porcelain"], source)
    diff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], source)
    if status is None or diff is None:
        return state
    state["git_dirty"] = bool(status.strip())
    if state["git_dirty"]:  # which changes: two dirty trees of one commit can differ
        digest = hashlib.sha256(status + b"\0" + diff)
        _hash_untracked(digest, source)
        state["git_changes"] = digest.hexdigest()[:12]
    return state


def _hash_untracked(digest, source: Path) -> None:
    """Add the names and contents of the untracked, non-ignored files of the whole checkout
    (``git status`` names them, ``git diff`` leaves their content out)."""
    top = _git(["rev-parse", "--show-toplevel"], source)
    root = Path(os.fsdecode(top.strip())) if top else None
    listed = _git(["ls-files", "--others", "--exclude-standard", "-z"], root) if root else None
    if listed is None:
        digest.update(b"\0untracked:" + UNKNOWN.encode())
        return
    for name in sorted(filter(None, listed.split(b"\0"))):
        digest.update(b"\0" + name + b"\0")
        try:
            digest.update(bytes.fromhex(_file_hash(root / os.fsdecode(name))))
        except OSError:  # removed or unreadable after it was listed: its name still counts
            digest.update(b"unreadable")


def code_version(code: dict[str, Any]) -> str:
    """One string naming the code: ``0.1.0+1a2b3c4d5e6f`` (``.dirty-<changes>``) or ``0.1.0+unknown``."""
    commit = code.get("git_commit", UNKNOWN)
    version = f"{code.get('package_version', UNKNOWN)}+{commit[:12]}"
    return version + (f".dirty-{code.get('git_changes', UNKNOWN)}" if code.get("git_dirty") else "")


def config_hash(cfg) -> str:
    """Hash of the resolved configuration without the seed and the run's locations: those
    keys are left out and paths below the run's folders (e.g. the checkpoint callbacks'
    ``dirpath``) are written relative to them, so trials of one sweep share the hash."""
    from omegaconf import OmegaConf

    from mchad.runs.resume import replace_path_prefix

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container = _without_seed(container, container.get("seed"))
    places = {**(container.get("paths") or {}), "dataset_dir": container.get("dataset_dir")}
    # longest first: output_dir lies below log_dir, which lies below root_dir
    prefixes = sorted(
        ((str(v), f"<{k}>") for k, v in places.items() if isinstance(v, str) and v), key=lambda p: -len(p[0])
    )
    content = {k: v for k, v in container.items() if k not in _RUN_KEYS}
    for prefix, name in prefixes:
        content = replace_path_prefix(content, prefix, name)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_seed(value: Any, seed: Any) -> Any:
    """``value`` with every ``seed`` entry that holds the run's seed (``datamodule.seed: ${seed}``,
    resolved or not: a resumed run's config.yaml is resolved) replaced by a placeholder."""
    if isinstance(value, dict):
        return {k: "<seed>" if k == "seed" and v == seed else _without_seed(v, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_seed(v, seed) for v in value]
    return value


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def device_name(trainer) -> str:
    """The GPU's name, or the CPU's model name, of the trainer's root device."""
    import torch

    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device is not None and device.type not in ("cpu", "cuda"):
        return str(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU: {model or platform.processor() or platform.machine()}"


def environment(trainer) -> dict[str, Any]:
    import numpy
    import pytorch_lightning
    import torch

    try:
        from importlib.metadata import version

        pytorch_ood = version("pytorch-ood")
    except Exception:  # not installed as a distribution
        pytorch_ood = UNKNOWN
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "lightning": pytorch_lightning.__version__,
        "pytorch_ood": pytorch_ood,
        "numpy": numpy.__version__,
        "device": device_name(trainer),
        "host": platform.node(),
        "platform": platform.platform(),
    }


def record(
    cfg, code: dict[str, Any], datamodule, trainer, rows: list[dict], output_dir: Path, checkpoint: Path | None = None
) -> list[dict]:
    """Write ``provenance.json`` into ``output_dir``; return ``rows`` with the provenance columns."""
    datasets = dict(getattr(datamodule, "fingerprints", {}) or {})
    shared = [f"{name}={datasets[name]}" for name in sorted(datasets) if not name.startswith("ood/")]
    info = {
        "code": {**code, "version": code_version(code)},
        "environment": environment(trainer),
        "datasets": datasets,
        "config_hash": config_hash(cfg),
        "command": sys.argv,
    }
    if checkpoint is not None:
        info["checkpoint"] = {"path": str(checkpoint), "sha256": _file_hash(checkpoint)}
    _write_json(info, Path(output_dir) / PROVENANCE_FILE)
    out = []
    for row in rows:
        case = f"ood/{row.get('test_case')}"
        data = _short_hash(*shared, f"{case}={datasets.get(case, UNKNOWN)}")
        out.append(
            {
                **row,
                "code_version": info["code"]["version"],
                "data_fingerprint": data,
                "config_hash": info["config_hash"],
            }
        )
    return out


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(content: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
