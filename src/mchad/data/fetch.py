"""Fetching a dataset once, safely, when several processes meet on the same ``dataset_dir``.

torchvision's and pytorch-ood's downloaders write the archive in place (``open(file, "wb")``)
and extract it in place, so trials that start together race on the same files. Here:

- :func:`locked`: one ``filelock`` lock per dataset (``<dataset_dir>/.locks/<name>.lock``)
  around fetch, extract and decode; a second process waits for the first, then finds the data;
- :func:`obtain`: the library's own constructor first reads what is there (its checks: MD5 of
  the files or the archive); if that fails, the same constructor downloads (``download=True``:
  the library's URL, progress bar and MD5 check) into a temporary folder next to the data,
  and what it leaves there is renamed into place only once it is complete and verified. A
  partial or corrupted file is fetched again; offline (or ``download=false``) one line names
  the dataset, the file and how to get it. We call the libraries' downloaders instead of
  writing HTTP again; only where they put their files is ours.

A folder the user cannot write (a shared, read-only copy) needs no lock: no process can
change it, so :func:`locked` then goes on without one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mchad.errors import DataNotFoundError, first_line

log = logging.getLogger(__name__)

LOCK_FOLDER = ".locks"
#: tries of a download before it stops with one line (a cut connection fails the MD5 check)
ATTEMPTS = 2
#: prefix of the temporary folders a fetch downloads into (removed when it ends)
STAGING_PREFIX = ".fetching-"
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.xz", ".tar.bz2")
T = TypeVar("T")


def lock_path(folder: Path | str, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(folder) / LOCK_FOLDER / f"{safe}.lock"


@contextmanager
def locked(folder: Path | str, name: str) -> Iterator[None]:
    """Hold ``name``'s lock in ``folder`` (waiting, with one log line, while another process holds it)."""
    from filelock import FileLock, Timeout

    path = lock_path(folder, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: waiting for another process that prepares it (lock %s)", name, path)
            lock.acquire()
    except OSError as error:  # read-only dataset_dir: nobody can write there, nothing to race on
        log.debug("%s: no lock in %s (%s)", name, folder, first_line(error))
        yield
        return
    try:
        yield
    finally:
        lock.release()


def obtain(
    name: str,
    root: Path,
    construct: Callable[[Path, bool], T],
    download: bool,
    how: str,
    files: dict[str, str | None] | None = None,
    lock: str | None = None,
) -> T:
    """``construct(root, False)``: the library's dataset read from ``root``; if that fails,
    fetched once under the data set's lock (``lock``, default ``name``; :func:`fetch_into`)
    and read again.

    ``files``: the file names (in ``root``) the library downloads and their MD5 sums, to name
    an incomplete or corrupted one; ``how``: how to get the data by hand (offline message).
    """
    try:
        return construct(root, False)  # complete: the library checked it, no lock needed
    except Exception:  # noqa: BLE001 - missing, partial or corrupted: fetched (or explained) below
        pass
    with locked(root, lock or name):
        try:
            return construct(root, False)  # another process fetched it while this one waited
        except Exception as error:  # noqa: BLE001 - the cause goes into the message
            cause = error
        if not download:
            raise missing(name, root, how, cause, files, "download=false")
        fetch_into(name, root, lambda tmp: construct(tmp, True), how, files)
        return construct(root, False)


def fetch_into(
    name: str, root: Path, download: Callable[[Path], object], how: str, files: dict[str, str | None] | None = None
) -> None:
    """Run ``download(tmp)`` (a library's downloader) in a temporary folder inside ``root`` and
    rename what it leaves into ``root`` once it returned (it verified the MD5 sums). Files of
    ``files`` already in ``root`` and verified are linked into the folder first, so that an
    archive that is there is not downloaded again. Tried :data:`ATTEMPTS` times; then one line."""
    root.mkdir(parents=True, exist_ok=True)
    error: BaseException | None = None
    for attempt in range(1, ATTEMPTS + 1):
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
        try:
            _link_verified(root, staging, files or {})
            download(staging)
            move_into(staging, root)
            log.info("%s: fetched into %s", name, root)
            return
        except Exception as failure:  # noqa: BLE001 - offline, cut connection, MD5 mismatch: retried, then one line
            error = failure
            log.warning("%s: download attempt %d of %d failed: %s", name, attempt, ATTEMPTS, first_line(failure))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise missing(name, root, how, error, files, f"download failed {ATTEMPTS} times")


def _link_verified(root: Path, staging: Path, files: dict[str, str | None]) -> None:
    """Verified files of ``root`` linked into ``staging``, archives unpacked there: pytorch-ood
    extracts only what it downloads, so a verified archive alone would never be unpacked."""
    from torchvision.datasets.utils import check_integrity, extract_archive

    for filename, md5 in files.items():
        source = root / filename
        # only a verified file: the library rewrites (truncates) a file whose MD5 differs
        if md5 and check_integrity(str(source), md5):
            (staging / filename).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, staging / filename)
            except OSError:  # no hard links on this file system: a copy
                shutil.copy2(source, staging / filename)
            if filename.endswith(ARCHIVES):
                extract_archive(str(staging / filename), str(staging))


def move_into(staging: Path, root: Path) -> None:
    """Rename every entry of ``staging`` into ``root``; an entry there already (a partial
    folder, a corrupted file) is moved into ``staging`` first and removed with it."""
    for entry in sorted(os.listdir(staging)):
        if entry.startswith("."):
            continue
        target = root / entry
        if target.is_dir() and not target.is_symlink():
            os.replace(target, staging / f".old-{entry}")
        os.replace(staging / entry, target)


def missing(
    name: str,
    root: Path,
    how: str,
    cause: BaseException | None,
    files: dict[str, str | None] | None,
    why: str,
) -> DataNotFoundError:
    """One line: what is missing or corrupted in ``root``, why it was not fetched, how to get it."""
    state = file_states(root, files or {})
    if state:  # what is wrong with the files says more than the library's generic message
        reason = f"{why}; {state}"
    else:
        reason = f"{why}: {first_line(cause)}" if cause is not None else why
    return DataNotFoundError(f"{name} not found in {root} ({reason}). {how}")


def file_states(root: Path, files: dict[str, str | None]) -> str:
    """``"cifar-10-python.tar.gz absent"`` (none there: the first, the download), else every
    file that is absent or whose MD5 differs (incomplete or corrupted)."""
    from torchvision.datasets.utils import check_integrity

    absent = [f for f in files if not (root / f).exists()]
    if files and len(absent) == len(files):
        return f"{absent[0]} absent"
    states = [f"{f} absent" for f in absent]
    for filename, md5 in files.items():
        path = root / filename
        if filename not in absent and md5 and not check_integrity(str(path), md5):
            states.append(f"{path} MD5 differs from the library's (incomplete or corrupted)")
    return ", ".join(states)


def checksums_ok(root: Path, files: dict[str, str | None]) -> bool | None:
    """Whether every file of ``files`` in ``root`` has its MD5 (None: no checksum known)."""
    from torchvision.datasets.utils import check_integrity

    known = {f: md5 for f, md5 in files.items() if md5}
    if not known:
        return None
    return all(check_integrity(str(root / f), md5) for f, md5 in known.items())


def library_files(cls) -> dict[str, str | None]:
    """The file a torchvision or pytorch-ood dataset class downloads and its MD5 (class attributes)."""
    filename = getattr(cls, "filename", None)
    md5 = next((getattr(cls, a) for a in ("tgz_md5", "md5hash", "md5") if isinstance(getattr(cls, a, None), str)), None)
    return {filename: md5} if isinstance(filename, str) else {}


def constructor(cls, **kwargs) -> Callable[[Path, bool], object]:
    """``(folder, download) -> cls(root=folder, download=download, **kwargs)``, for :func:`obtain`."""
    return lambda folder, download: cls(root=str(folder), download=download, **kwargs)
