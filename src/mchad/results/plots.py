"""Plotting helpers: 2-D embedding frames (and GIF animations of them), score histograms
and ROC curves.

Every function is pure: it takes arrays (NumPy arrays or torch tensors, on any device),
writes one image file and returns its path. Figures are built with
:class:`matplotlib.figure.Figure` and rendered by the Agg canvas directly, never through
``pyplot``: no display is needed, the global matplotlib backend is left untouched, no
figure is kept alive in a global registry (no leak over hundreds of epochs) and the
functions may be called from several threads.

Conventions (see the project's method notes):

* Labels ``>= 0`` are known classes; a **negative label marks an outlier**.
* Distances are **squared** Euclidean distances in the published semantics. The radius
  ``r`` (``L_center = max(0, d_y - r)``) and the margin ``m`` (outliers are pushed until
  ``d_i >= m``) therefore bound *squared* distances, and the corresponding circle in
  embedding space has radius ``sqrt(r)`` (resp. ``sqrt(m)``). Pass ``squared=False`` when
  ``radius``/``margin`` already are Euclidean lengths (e.g. for the paper-equation reading
  of the margin, whose boundary is ``||f(x) - mu|| = r + m``: pass ``margin=r + m``).
* OOD scores: larger = more anomalous; OOD is the positive class of the ROC curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

__all__ = [
    "axis_limits",
    "embedding_frame",
    "assemble_gif",
    "distance_histogram",
    "roc_points",
    "roc_curve_plot",
]

#: Default cap on the number of points drawn in an embedding frame.
MAX_POINTS = 5000

_OUTLIER_COLOR = (0.55, 0.55, 0.55, 1.0)


# ---------------------------------------------------------------------------- helpers


def _to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Convert a NumPy array, torch tensor (any device, with or without grad), list or
    scalar into a NumPy array of ``dtype``. Never imports torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if hasattr(x, "is_floating_point") and x.is_floating_point() and dtype is not None:
            x = x.float()  # bfloat16/half have no NumPy equivalent
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _prepare_path(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    try:
        fig.savefig(path, format="png", dpi=dpi)
    finally:
        fig.clear()  # drop artists eagerly; the Figure itself is unreferenced afterwards
    return path


def _circle_radii(
    radius: float | Sequence[float] | np.ndarray | None, n_centers: int, squared: bool, name: str
) -> np.ndarray | None:
    """Per-centre circle radii in embedding space (``sqrt`` applied when ``squared``)."""
    if radius is None:
        return None
    r = _to_numpy(radius).reshape(-1)
    if r.size == 1:
        r = np.full(n_centers, float(r[0]))
    if r.shape != (n_centers,):
        raise ValueError(f"{name} must be a scalar or have one value per centre ({n_centers}), got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {r}")
    return np.sqrt(r) if squared else r


def _class_colors(n_classes: int) -> np.ndarray:
    """RGBA colours per class; the grey entries of tab10/tab20 are replaced so that no
    class looks like the (grey) outliers."""
    if n_classes <= 10:
        pal = colormaps["tab10"](np.arange(10))
        pal[7] = colormaps["tab20b"](0)  # dark indigo instead of grey
        return pal[:n_classes]
    if n_classes <= 20:
        pal = colormaps["tab20"](np.arange(20))
        pal[14], pal[15] = colormaps["tab20b"](0), colormaps["tab20b"](2)
        return pal[:n_classes]
    return colormaps["turbo"](np.linspace(0.05, 0.95, n_classes))


def _subsample_indices(n: int, max_points: int | None) -> np.ndarray:
    """Deterministic subsample (same ``n`` -> same indices, so animation frames agree)."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# ---------------------------------------------------------------------------- limits


def axis_limits(
    embeddings: Any,
    centers: Any,
    radius: float | Sequence[float] | np.ndarray | None = 0.0,
    pad: float = 0.1,
    *,
    margin: float | Sequence[float] | np.ndarray | None = None,
    squared: bool = True,
) -> tuple[float, float, float, float]:
    """Axis limits ``(xmin, xmax, ymin, ymax)`` enclosing all points, all centres and
    their circles, padded by ``pad`` times the span on every side.

    Compute them once (e.g. from the embeddings of all epochs concatenated, or of the last
    epoch) and pass them to every :func:`embedding_frame` so an animation does not jump.
    ``radius``/``margin``/``squared`` have the meaning of :func:`embedding_frame`.
    Non-finite embeddings are ignored.
    """
    emb = _to_numpy(embeddings).reshape(-1, 2)
    cen = _to_numpy(centers).reshape(-1, 2)
    emb = emb[np.all(np.isfinite(emb), axis=1)]
    boxes = []
    if len(emb):
        boxes.append(np.array([emb[:, 0].min(), emb[:, 0].max(), emb[:, 1].min(), emb[:, 1].max()]))
    if len(cen):
        ext = np.zeros(len(cen))
        for value, name in ((radius, "radius"), (margin, "margin")):
            rr = _circle_radii(value, len(cen), squared, name)
            if rr is not None:
                ext = np.maximum(ext, rr)
        boxes.append(
            np.array(
                [(cen[:, 0] - ext).min(), (cen[:, 0] + ext).max(), (cen[:, 1] - ext).min(), (cen[:, 1] + ext).max()]
            )
        )
    if not boxes:
        return (-1.0, 1.0, -1.0, 1.0)
    b = np.stack(boxes)
    xmin, xmax = float(b[:, 0].min()), float(b[:, 1].max())
    ymin, ymax = float(b[:, 2].min()), float(b[:, 3].max())
    span_x, span_y = xmax - xmin, ymax - ymin
    span = max(span_x, span_y, 1e-6)
    # Avoid degenerate (zero-width) axes: fall back to the other axis' span.
    px = pad * (span_x if span_x > 0 else span)
    py = pad * (span_y if span_y > 0 else span)
    if span_x == 0:
        px = max(px, 0.5 * span)
    if span_y == 0:
        py = max(py, 0.5 * span)
    return (xmin - px, xmax + px, ymin - py, ymax + py)


# ---------------------------------------------------------------------------- frames


def embedding_frame(
    embeddings: Any,
    labels: Any,
    centers: Any,
    radius: float | Sequence[float] | np.ndarray,
    margin: float | Sequence[float] | np.ndarray | None,
    path: str | Path,
    title: str = "",
    limits: tuple[float, float, float, float] | None = None,
    *,
    squared: bool = True,
    max_points: int | None = MAX_POINTS,
    class_names: Sequence[str] | None = None,
    figsize: tuple[float, float] = (7.5, 6.0),
    dpi: int = 100,
) -> Path:
    """Scatter plot of 2-D embeddings with class centres and hyperspheres, saved as PNG; returns its path.

    Args:
        embeddings: ``(N, 2)`` embeddings ``f(x)``.
        labels: ``(N,)`` integer labels; ``>= 0`` = class index (must be ``< C``),
            negative = outlier (drawn grey, below the known classes).
        centers: ``(C, 2)`` class centres ``mu_c`` (drawn as black crosses).
        radius: hypersphere radius ``r`` (scalar or one per centre); a solid circle is
            drawn around each centre (none where the circle radius is 0).
        margin: margin ``m`` (scalar or one per centre) or ``None``; drawn dashed.
        path: output PNG path (parent folders are created).
        title: axes title.
        limits: fixed ``(xmin, xmax, ymin, ymax)``, e.g. from :func:`axis_limits`, so the
            frames of an animation share axes; default: fitted to this frame's data.
        squared: ``True`` (default, the published semantics): ``radius`` and ``margin``
            bound **squared** distances ``||f(x) - mu||^2``, so the circles have radius
            ``sqrt(radius)`` and ``sqrt(margin)``. ``False``: they are Euclidean lengths
            and are drawn as given.
        max_points: at most this many points are drawn (deterministic random subset,
            identical for equal ``N``); ``None`` draws all.
        class_names: legend names of the classes (default ``"class k"``).
        figsize, dpi: figure size in inches and resolution. Keep them fixed over an
            animation (frames of one GIF must have equal pixel sizes).
    """
    emb, lab, cen = _frame_arrays(embeddings, labels, centers, class_names)
    n_classes = cen.shape[0]
    radii = _circle_radii(radius, n_classes, squared, "radius")
    margins = _circle_radii(margin, n_classes, squared, "margin")
    limits = limits or axis_limits(emb, cen, radius, margin=margin, squared=squared)
    idx = _subsample_indices(emb.shape[0], max_points)
    colors = _class_colors(n_classes)
    fig = _new_figure(figsize, dpi)
    fig.subplots_adjust(left=0.12, right=0.75, bottom=0.08, top=0.93)
    ax = fig.add_subplot(1, 1, 1)
    handles = _draw_points(ax, emb[idx], lab[idx], colors, class_names, n_classes)
    edges = colors if n_classes <= 20 else ["black"] * n_classes
    for circles, style, what, raw in ((radii, "-", "radius", radius), (margins, "--", "margin", margin)):
        if circles is not None:
            handles.append(_draw_circles(ax, cen, circles, edges, style, what, raw, squared))
    ax.scatter(cen[:, 0], cen[:, 1], marker="x", s=60, c="black", linewidths=2, zorder=4)
    handles.append(Line2D([], [], ls="", marker="x", ms=8, mew=2, color="black", label="centre"))
    _equal_axes(ax, limits, ("$f(x)_1$", "$f(x)_2$"), title)  # circles stay circles
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, _prepare_path(path), dpi)


def _equal_axes(ax, limits: tuple[float, float, float, float], labels: tuple[str, str], title: str) -> None:
    """Axes within ``limits`` (xmin, xmax, ymin, ymax) at equal scale, labelled, with a light grid."""
    ax.set_xlim(limits[0], limits[1])
    ax.set_ylim(limits[2], limits[3])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title)
    ax.grid(True, lw=0.4, alpha=0.4)


def _frame_arrays(embeddings, labels, centers, class_names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The embeddings, labels and centres of a frame as arrays, checked to fit each other."""
    emb = _to_numpy(embeddings)
    lab = _to_numpy(labels, dtype=np.int64).reshape(-1)
    cen = _to_numpy(centers)
    if emb.ndim != 2 or emb.shape[1] != 2:
        raise ValueError(f"embeddings must have shape (N, 2), got {emb.shape}")
    if cen.ndim != 2 or cen.shape[1] != 2:
        raise ValueError(f"centers must have shape (C, 2), got {cen.shape}")
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(f"got {emb.shape[0]} embeddings but {lab.shape[0]} labels")
    n_classes = cen.shape[0]
    if lab.size and lab.max() >= n_classes:
        raise ValueError(f"label {int(lab.max())} has no centre (only {n_classes} centres given)")
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} entries for {n_classes} centres")
    return emb, lab, cen


def _draw_points(ax, emb, lab, colors, class_names, n_classes: int) -> list[Any]:
    """The outliers (grey, below) and the known classes; their legend entries (the classes' only
    up to 20 classes)."""
    handles: list[Any] = []
    outlier = lab < 0
    if outlier.any():
        pts = emb[outlier]
        ax.scatter(pts[:, 0], pts[:, 1], s=5, color=_OUTLIER_COLOR, alpha=0.35, linewidths=0, zorder=1)
        handles.append(Line2D([], [], ls="", marker="o", ms=5, color=_OUTLIER_COLOR, label="outlier"))
    known = ~outlier
    if known.any():
        pts = emb[known]
        ax.scatter(pts[:, 0], pts[:, 1], s=5, c=colors[lab[known]], alpha=0.6, linewidths=0, zorder=2)
    if n_classes <= 20:
        for k in range(n_classes):
            name = class_names[k] if class_names is not None else f"class {k}"
            handles.append(Line2D([], [], ls="", marker="o", ms=5, color=colors[k], label=name))
    return handles


def _draw_circles(ax, cen, circles, edges, style: str, what: str, raw, squared: bool) -> Any:
    """One circle per centre (none of radius 0) for ``what`` (radius or margin); its legend entry."""
    for k in range(len(cen)):
        if circles[k] > 0:
            ax.add_patch(Circle(tuple(cen[k]), circles[k], fill=False, ls=style, lw=1.3, ec=edges[k], zorder=3))
    raw_arr = _to_numpy(raw).reshape(-1)
    sym = "r" if what == "radius" else "m"
    if raw_arr.size == 1:
        value = float(raw_arr[0])
        text = f"{what} $\\sqrt{{{sym}}}$, {sym}={_fmt(value)}" if squared else f"{what} {sym}={_fmt(value)}"
    else:
        text = f"{what} $\\sqrt{{{sym}_c}}$" if squared else f"{what} {sym}_c"
    return Line2D([], [], ls=style, lw=1.3, color="black", label=text)


def assemble_gif(frame_paths: Sequence[str | Path], out_path: str | Path, duration_ms: int = 300) -> Path:
    """Combine image frames (e.g. PNGs of :func:`embedding_frame`) into an animated GIF
    that loops forever, ``duration_ms`` per frame.

    Frames whose pixel size differs from the first are resized to it. Note that Pillow
    merges *identical consecutive* frames into one (adding their durations), so the GIF
    has one frame per distinct consecutive image.
    """
    from PIL import Image

    frame_paths = list(frame_paths)
    if not frame_paths:
        raise ValueError("assemble_gif: frame_paths is empty; need at least one frame to build a GIF")
    if duration_ms <= 0:
        raise ValueError(f"duration_ms must be > 0, got {duration_ms}")
    frames = []
    size = None
    for p in frame_paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")  # drops alpha; plots have an opaque white background
        if size is None:
            size = rgb.size
        elif rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        # Adaptive palette per frame, no dithering: flat plot colours stay clean.
        frames.append(rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    out_path = _prepare_path(out_path)
    frames[0].save(
        out_path,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=int(duration_ms),
        loop=0,
        disposal=1,
    )
    return out_path


# ---------------------------------------------------------------------------- scores


def distance_histogram(
    id_scores: Any,
    ood_scores: Any,
    path: str | Path,
    title: str = "",
    score_name: str = "min distance",
    *,
    bins: int = 60,
    figsize: tuple[float, float] = (6.4, 4.4),
    dpi: int = 100,
) -> Path:
    """Overlaid density histograms of ID and OOD scores with shared bins, saved as PNG.

    The x axis is logarithmic (with log-spaced bins) when all finite scores are positive
    and span more than two orders of magnitude; the density is then per decade
    (per unit of ``log10(score)``), so areas on the plot stay proportional to counts. Non-finite scores are dropped
    (their
    count is noted in the legend). One of the two sets may be empty, not both.
    """
    ids = _to_numpy(id_scores).reshape(-1)
    ood = _to_numpy(ood_scores).reshape(-1)
    n_bad = {"ID": int((~np.isfinite(ids)).sum()), "OOD": int((~np.isfinite(ood)).sum())}
    ids, ood = ids[np.isfinite(ids)], ood[np.isfinite(ood)]
    both = np.concatenate([ids, ood])
    if both.size == 0:
        raise ValueError("distance_histogram: no finite scores in id_scores and ood_scores")
    path = _prepare_path(path)
    lo, hi = float(both.min()), float(both.max())
    log_x = lo > 0 and hi / lo > 100.0
    if log_x:
        edges = np.geomspace(lo, hi, bins + 1)
    elif hi > lo:
        edges = np.linspace(lo, hi, bins + 1)
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1)

    widths = np.diff(np.log10(edges)) if log_x else np.diff(edges)

    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    for values, name, color in ((ids, "ID", "tab:blue"), (ood, "OOD", "tab:red")):
        if values.size == 0:
            continue
        label = f"{name} (n={values.size}" + (f", {n_bad[name]} non-finite dropped)" if n_bad[name] else ")")
        counts, _ = np.histogram(values, bins=edges)
        density = counts / (values.size * widths)
        ax.stairs(density, edges, fill=True, alpha=0.45, color=color, label=label)
        ax.stairs(density, edges, lw=1.2, color=color)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(score_name + (" (log scale)" if log_x else ""))
    ax.set_ylabel("density per decade" if log_x else "density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def roc_points(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve with **OOD as the positive class** and larger score = more anomalous.

    Returns ``(fpr, tpr, auroc)``: the curve's vertices, one per distinct score threshold
    (ties are one threshold, hence one diagonal segment), from ``(0, 0)`` to ``(1, 1)``,
    and the area under it by the trapezoidal rule, which equals the Mann-Whitney
    statistic ``P(ood > id) + 0.5 * P(ood == id)``.
    """
    ids = _to_numpy(id_scores).reshape(-1)
    ood = _to_numpy(ood_scores).reshape(-1)
    if ids.size == 0 or ood.size == 0:
        raise ValueError(f"roc_points needs ID and OOD scores, got {ids.size} ID and {ood.size} OOD")
    scores = np.concatenate([ids, ood])
    if np.isnan(scores).any():
        raise ValueError("roc_points: scores contain NaN")
    positive = np.concatenate([np.zeros(ids.size), np.ones(ood.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # Last index of each run of equal scores = one threshold.
    last = np.flatnonzero(np.diff(scores) != 0)
    last = np.append(last, scores.size - 1)
    tps = np.cumsum(positive)[last]
    fps = (last + 1) - tps
    tpr = np.concatenate([[0.0], tps / ood.size])
    fpr = np.concatenate([[0.0], fps / ids.size])
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return fpr, tpr, auroc


def roc_curve_plot(
    id_scores: Any,
    ood_scores: Any,
    path: str | Path,
    title: str = "",
    *,
    figsize: tuple[float, float] = (5.0, 5.0),
    dpi: int = 100,
) -> Path:
    """ROC curve (OOD = positive class, larger score = more anomalous) with the AUROC in
    the legend, saved as PNG. The curve comes from :func:`roc_points`."""
    fpr, tpr, auroc = roc_points(id_scores, ood_scores)
    path = _prepare_path(path)
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, lw=1.8, color="tab:blue", label=f"AUROC = {auroc:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    labels = ("false positive rate (ID flagged as OOD)", "true positive rate (OOD detected)")
    _equal_axes(ax, (0, 1, 0, 1.01), labels, title)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)
