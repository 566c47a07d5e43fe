"""plot_history writes valid PNGs for the keys present and skips the rest."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from dpl.run.plots import plot_history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(epochs: int = 4) -> list[dict[str, float]]:
    return [
        {
            "epoch": e + 1,  # as history.csv counts them
            "train_loss": 2.0 / (e + 1),
            "val_loss": 2.2 / (e + 1),
            "train_acc": 0.2 * e,
            "val_acc": 0.18 * e,
            "lr": 0.1 * math.cos(e / epochs),
            "H": 2**e,
            "comm_bytes_total": 1e6 * (e + 1),
            "modelled_time_s": 3.0 * (e + 1),
            "sync_rounds_total": 10 * (e + 1),
        }
        for e in range(epochs)
    ]


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_full_history_writes_every_figure(tmp_path):
    paths = plot_history(_history(), tmp_path)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "lr.png", "comm.png", "h.png"]
    assert all(p.parent == tmp_path and _is_png(p) for p in paths)
    # Atomic writes leave no temp files beside the figures.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_missing_keys_skip_their_figures(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 0.1} for e in range(3)]
    paths = plot_history(history, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "lr.png"]


def test_comm_figure_with_only_one_axis_quantity(tmp_path):
    history = [{"epoch": e, "val_acc": 0.1 * e, "modelled_time_s": 1.0 + e} for e in range(3)]
    names = [p.name for p in plot_history(history, tmp_path)]
    assert names == ["accuracy.png", "comm.png"]


def test_comm_needs_val_acc(tmp_path):
    history = [{"epoch": e, "comm_bytes_total": 1e6 * e, "modelled_time_s": 1.0 + e} for e in range(3)]
    assert plot_history(history, tmp_path) == []


def test_empty_history_writes_nothing(tmp_path):
    assert plot_history([], tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_rows_without_epoch_and_nan_values(tmp_path):
    # Epoch falls back to the row index; a diverged (nan) loss must not stop the plot.
    history = [{"train_loss": 1.0}, {"train_loss": float("nan")}, {"train_loss": 0.5}]
    (path,) = plot_history(history, tmp_path)
    assert path.name == "loss.png" and _is_png(path)


def test_overwrites_existing_figure(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"old")
    plot_history([{"epoch": 0, "val_loss": 1.0}], tmp_path)
    assert _is_png(tmp_path / "loss.png")


def test_plotting_never_touches_pyplot(tmp_path):
    # No pyplot means no global figure list to leak into and no display backend needed.
    code = (
        "import sys; from dpl.run.plots import plot_history; "
        f"plot_history({_history(2)!r}, {str(tmp_path)!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "comm.png").exists()


@pytest.mark.parametrize("key", ["H", "lr"])
def test_single_key_figures(tmp_path, key):
    (path,) = plot_history([{"epoch": e, key: 1.0 + e} for e in range(2)], tmp_path)
    assert path.name == {"H": "h.png", "lr": "lr.png"}[key] and _is_png(path)


@pytest.mark.parametrize("epochs", [1, 4])
def test_every_run_figure_is_legible(epochs):
    from dpl.run.plots import _FIGURES
    from tests.legible import assert_legible

    for name, draw in _FIGURES.items():
        fig = draw(_history(epochs))
        assert_legible(fig, name)
        if name != "comm.png":  # epochs on x: whole numbers, counted from 1
            ax = fig.axes[0]
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(t == int(t) and t >= 1 for t in ticks), (name, ticks)


@pytest.mark.parametrize("panels,entries,label_len", [(1, 1, 60), (1, 20, 80), (3, 12, 20), (2, 20, 120)])
def test_legend_outside_grows_the_figure_and_keeps_clear_of_title_and_data(panels, entries, label_len):
    """However many and however long the entries, the legend lies right of the panels, below the
    suptitle, inside the figure; the panels keep the width they had without a legend."""
    from dpl.run.plots import legend_outside, new_figure
    from tests.legible import assert_legible

    def draw(with_legend: bool):
        fig, axes = new_figure(panels)
        fig.suptitle("a suptitle as long as the report's: test accuracy against communication rounds")
        for n, ax in enumerate(axes):
            ax.set_title(f"panel {n}")
            for i in range(entries):
                ax.plot([1, 2, 3], [0.1 * i, 0.2, 0.3], label=f"group {i} " + "x" * label_len)
        if with_legend:
            legend_outside(fig)
        fig.canvas.draw()
        return fig

    plain, fig = draw(False), draw(True)
    assert_legible(fig, f"{panels} panels, {entries} entries")
    (legend,) = fig.legends
    assert len(legend.get_texts()) == entries
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert box.x0 >= max(ax.get_window_extent(renderer).x1 for ax in fig.axes)  # right of every panel
    assert box.y1 <= fig._suptitle.get_window_extent(renderer).y0  # below the title
    widths = lambda f: [ax.get_window_extent(f.canvas.get_renderer()).width for ax in f.axes]  # noqa: E731
    # within 2%: the gap between panels is a fraction of the figure's width, which grew
    assert widths(fig) == pytest.approx(widths(plain), rel=0.02)


def test_legend_outside_leaves_out_a_legend_of_too_many_entries():
    from dpl.run.plots import legend_outside, new_figure

    fig, (ax,) = new_figure(1)
    for i in range(21):
        ax.plot([0, 1], [i, i], label=str(i))
    size = tuple(fig.get_size_inches())
    legend_outside(fig)
    assert fig.legends == [] and tuple(fig.get_size_inches()) == size


@pytest.mark.parametrize("lo,hi,view", [(0.19, 0.1995, (0.1, 0.2)), (0.19, 0.2, (0.1, 0.3)), (0.0, 0.05, (0.0, 0.1)),
                                        (0.91, 1.0, (0.9, 1.0)), (0.42, 0.87, (0.4, 0.9))])
def test_percent_axis_spans_round_tens_of_points(lo, hi, view):
    from dpl.run.plots import new_figure, percent_axis

    fig, (ax,) = new_figure(1)
    ax.plot([0, 1], [lo, hi])
    percent_axis(ax)  # limits from the data drawn
    bottom, top = ax.get_ylim()
    margin = 0.02 * (view[1] - view[0])
    assert (bottom, top) == (pytest.approx(view[0] - margin), pytest.approx(view[1] + margin))
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if bottom <= t.get_position()[1] <= top]
    assert labels[0] == f"{round(view[0] * 100)}%" and labels[-1] == f"{round(view[1] * 100)}%"


def test_run_accuracy_figures_are_in_percent():
    from dpl.run.plots import _FIGURES

    for name in ("accuracy.png", "comm.png"):
        fig = _FIGURES[name](_history(4))
        fig.canvas.draw()
        for ax in fig.axes:
            assert all(t.get_text().endswith("%") for t in ax.get_yticklabels() if t.get_text()), name
