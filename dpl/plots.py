"""Per-run figures from the epoch history: loss, accuracy, lr, communication, H.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` and rendered by
the Agg canvas, never through pyplot: no display is needed, no global figure list grows
over the many calls of a sweep, and a user's interactive backend is left alone.
Each PNG is written atomically (a run killed mid-save leaves the old file or none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpl.io import atomic_temp_path

History = Sequence[Mapping[str, float]]
_MIB = 2.0**20


def plot_history(history: History, out_dir: str | Path) -> list[Path]:
    """Write loss.png, accuracy.png, lr.png, comm.png and h.png for the keys present; return their paths."""
    out_dir = Path(out_dir)
    written = []
    for name, draw in _FIGURES.items():
        fig = draw(history)
        if fig is not None:
            written.append(save_figure(fig, out_dir / name))
    return written


def _series(history: History, key: str, x_key: str = "epoch") -> tuple[list[float], list[float]]:
    """(x, y) over the epochs that have ``key``; x is the epoch (or the row index if absent)."""
    xs, ys = [], []
    for i, row in enumerate(history):
        if row.get(key) is None:
            continue
        x = row.get(x_key, i if x_key == "epoch" else None)
        if x is not None:
            xs.append(float(x))
            ys.append(float(row[key]))
    return xs, ys


def _curves(history: History, keys: Sequence[str], ylabel: str, title: str) -> Figure | None:
    """One axes with a curve per key present; None when no key is."""
    series = {k: _series(history, k) for k in keys}
    series = {k: xy for k, xy in series.items() if xy[0]}
    if not series:
        return None
    fig, ax = new_figure(1)
    for key, (xs, ys) in series.items():
        ax[0].plot(xs, ys, label=key.replace("_", " "))
    label_axes(ax[0], "epoch", ylabel, title)
    if len(series) > 1:
        ax[0].legend()
    return fig


def _loss(history: History) -> Figure | None:
    return _curves(history, ("train_loss", "val_loss"), "loss", "Loss")


def _accuracy(history: History) -> Figure | None:
    return _curves(history, ("train_acc", "val_acc"), "accuracy", "Accuracy")


def _lr(history: History) -> Figure | None:
    return _curves(history, ("lr",), "learning rate", "Learning rate")


def _h(history: History) -> Figure | None:
    return _curves(history, ("H",), "local steps H", "Local steps between syncs")


def _comm(history: History) -> Figure | None:
    """Validation accuracy against communication: MiB sent per worker, modelled time."""
    panels = []
    xs, ys = _series(history, "val_acc", "comm_bytes_total")
    if xs:
        panels.append(([x / _MIB for x in xs], ys, "MiB sent per worker (cumulative)", "Accuracy vs bytes sent"))
    xs, ys = _series(history, "val_acc", "modelled_time_s")
    if xs:
        panels.append((xs, ys, "modelled time (s)", "Accuracy vs modelled time"))
    if not panels:
        return None
    fig, axes = new_figure(len(panels))
    for ax, (xs, ys, xlabel, title) in zip(axes, panels):
        ax.plot(xs, ys, marker=".")
        label_axes(ax, xlabel, "val accuracy", title)
    return fig


_FIGURES = {"loss.png": _loss, "accuracy.png": _accuracy, "lr.png": _lr, "comm.png": _comm, "h.png": _h}


def new_figure(panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.0 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    fig.clear()  # drop the artists now rather than waiting for the collector
    return path
