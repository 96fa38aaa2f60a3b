"""One class list per dataset, read from the training data before anything is decoded.

Every other split of the same dataset (the test set, an open-set run's known and unknown
classes) must name the same classes in the same order: an image folder numbers its sorted
class folders, so a class folder missing from one split would shift every later label by
one and give meaningless accuracy and AUROC. ``datamodule.n_classes`` follows from the
training data unless set, and a set value that differs from it is refused.
"""

from __future__ import annotations

from mchad.data.sources import Source
from mchad.errors import ConfigError, DataError


def _names(classes: list[str], limit: int = 10) -> str:
    more = f" (+{len(classes) - limit} more)" if len(classes) > limit else ""
    return ", ".join(classes[:limit]) + more


def check_class_lists(name: str, train: Source, others: dict[str, Source]) -> None:
    """Refuse, in one line, a split whose class list differs from the training data's."""
    reference = train.class_names()
    if reference is None:
        return
    for split, source in others.items():
        names = source.class_names()
        if names is None or names == reference:
            continue
        extra = [c for c in names if c not in reference]
        lacking = [c for c in reference if c not in names]
        parts = [f"{split} has {_names(extra)}, which train lacks"] if extra else []
        parts += [f"{split} lacks {_names(lacking)}"] if lacking else []
        raise DataError(
            f"{name}: the classes of train ({train.describe()}) and {split} ({source.describe()}) differ: "
            f"{'; '.join(parts) or 'they are listed in another order'}; every split needs the same class "
            "folders (labels are numbered by the training data's sorted class list)"
        )


def resolve_n_classes(n_classes: int | None, train: Source) -> int:
    """``n_classes`` as configured, or the training data's number of classes when unset (None);
    a configured value that differs from the data's is refused."""
    count = train.class_count()
    if n_classes is None:
        if count is None:
            raise ConfigError(f"the number of classes of {train.describe()} is unknown: set datamodule.n_classes=N")
        return count
    if count is not None and count != n_classes:
        raise ConfigError(
            f"datamodule.n_classes={n_classes} but {train.describe()} has {count} classes; drop "
            f"datamodule.n_classes (it follows from the data) or set it to {count}"
        )
    return n_classes
