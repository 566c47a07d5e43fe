"""Checks that a rendered matplotlib figure is legible: tick labels apart, legends off the data and the
titles, everything inside the figure. Extents are the renderer's, at the dpi the figure is saved at."""

from __future__ import annotations

import math

PAD = 0.5  # pixels two boxes may touch by (antialiasing), not overlap


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - PAD and b.x0 < a.x1 - PAD and a.y0 < b.y1 - PAD and b.y0 < a.y1 - PAD


def _inside(box, outer) -> bool:
    return box.x0 >= outer.x0 - 1 and box.y0 >= outer.y0 - 1 and box.x1 <= outer.x1 + 1 and box.y1 <= outer.y1 + 1


def _edges(box, outer) -> str:
    """Which edges of ``outer`` a box crosses, for the failure message."""
    crossed = [side for side, out in (("left", box.x0 < outer.x0 - 1), ("bottom", box.y0 < outer.y0 - 1),
                                      ("right", box.x1 > outer.x1 + 1), ("top", box.y1 > outer.y1 + 1)) if out]
    return "past the " + " and ".join(crossed) + " edge"


def _in_view(value: float, lo: float, hi: float) -> bool:
    tol = 1e-9 * max(abs(lo), abs(hi), 1e-300)
    return lo - tol <= value <= hi + tol


def tick_labels(ax, which: str) -> list:
    """The non-empty major and minor tick labels drawn on one axis (ticks outside the view are not drawn)."""
    axis = getattr(ax, f"{which}axis")
    lo, hi = sorted(getattr(ax, f"get_{which}lim")())
    labels = []
    for minor in (False, True):
        for tick in axis.get_minor_ticks() if minor else axis.get_major_ticks():
            label = tick.label1
            pos = tick.get_loc()
            if label.get_visible() and label.get_text().strip() and pos is not None and math.isfinite(pos) \
                    and _in_view(pos, lo, hi):
                labels.append(label)
    return labels


def titles(fig, renderer) -> list[tuple[str, object]]:
    """(text, extent) of the figure's suptitle and of every axes title that is drawn."""
    texts = [fig._suptitle] if fig._suptitle is not None else []  # the artist has no public getter
    texts += [ax.title for ax in fig.axes]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def assert_legible(fig, name: str = "") -> None:
    """No two tick labels of an axis overlap; every tick label, title and legend lies inside the
    figure; no legend covers an axes' data area, a title or a tick label; no tick label runs into a
    title or another axes; every axes shows at least one x and one y tick label."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox
    axes_boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    named = titles(fig, renderer)
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    legend_boxes = [legend.get_window_extent(renderer) for legend in legends]
    for text, box in named:
        assert _inside(box, fig_box), f"{name}: title {text!r} is cut off ({_edges(box, fig_box)})"
    for n, ax in enumerate(fig.axes):
        for which in "xy":
            labels = tick_labels(ax, which)
            texts = [t.get_text() for t in labels]
            assert labels, f"{name}: no {which} tick labels"
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i, a in enumerate(boxes):
                assert _inside(a, fig_box), f"{name}: {which} tick label {texts[i]!r} is cut off"
                for j in range(i + 1, len(boxes)):
                    assert not _overlap(a, boxes[j]), f"{name}: {which} tick labels {texts[i]!r} and {texts[j]!r} overlap"
                for text, box in named:
                    assert not _overlap(a, box), f"{name}: {which} tick label {texts[i]!r} runs into title {text!r}"
                for box in legend_boxes:
                    assert not _overlap(a, box), f"{name}: legend covers {which} tick label {texts[i]!r}"
                for m, box in enumerate(axes_boxes):
                    assert m == n or not _overlap(a, box), f"{name}: {which} tick label {texts[i]!r} is on another axes"
    for box in legend_boxes:
        assert _inside(box, fig_box), f"{name}: legend is cut off ({_edges(box, fig_box)})"
        for ax_box in axes_boxes:
            assert not _overlap(box, ax_box), f"{name}: legend covers an axes"
        for text, title in named:
            assert not _overlap(box, title), f"{name}: legend covers title {text!r}"


MAX_WIDE, MAX_TALL = 3.0, 2.0  # width / height and height / width a figure may have (dpl.report.figures)


def assert_aspect(fig, name: str = "", wide: float = MAX_WIDE, tall: float = MAX_TALL) -> None:
    """The figure as drawn is at most ``wide`` times as wide as high and ``tall`` times as high as wide."""
    fig.canvas.draw()
    width, height = fig.bbox.width, fig.bbox.height
    assert width <= wide * height + 1, f"{name}: {width:.0f}x{height:.0f} px is wider than {wide:g}:1"
    assert height <= tall * width + 1, f"{name}: {width:.0f}x{height:.0f} px is taller than 1:{tall:g}"


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _ys(artist) -> list[float]:
    """The data y values an artist draws: a line's points, an error bar's or band's vertices."""
    import numpy as np
    from matplotlib.collections import Collection
    from matplotlib.lines import Line2D

    if isinstance(artist, Line2D):
        return [float(y) for y in np.asarray(artist.get_ydata(), dtype=float).ravel()]
    if isinstance(artist, Collection):
        return [float(y) for path in artist.get_paths() for y in path.vertices[:, 1]]
    return []


def percent_axes(fig) -> list:
    """The axes whose y axis is an accuracy in percent (dpl.run.plots.percent_axis)."""
    from matplotlib.ticker import PercentFormatter

    return [ax for ax in fig.axes if isinstance(ax.yaxis.get_major_formatter(), PercentFormatter)]


def assert_in_range(fig, name: str = "", lo: float = 0.0, hi: float = 1.0) -> None:
    """Everything drawn on an accuracy axis (points, lines, error bars, bands) lies in [lo, hi]:
    no interval of a bounded metric runs past 100 % or below 0 %."""
    for ax in percent_axes(fig):
        for artist in [*ax.lines, *ax.collections]:
            ys = [y for y in _ys(artist) if math.isfinite(y)]
            assert all(lo - 1e-12 <= y <= hi + 1e-12 for y in ys), \
                f"{name}: {type(artist).__name__} drawn at {min(ys):.4g}..{max(ys):.4g}, outside [{lo:g}, {hi:g}]"


def series(ax) -> list:
    """The labelled lines of an axes (a figure's series; error-bar caps and helpers are unlabelled)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def assert_distinct_colours(ax, name: str = "", exclude: tuple = ("Pareto front",)) -> None:
    """Every labelled line of the axes has a colour of its own."""
    from matplotlib.colors import to_rgba

    lines = [line for line in series(ax) if line.get_label() not in exclude]
    colours = [to_rgba(line.get_color()) for line in lines]
    assert len(set(colours)) == len(colours), f"{name}: {len(lines)} lines share {len(set(colours))} colours"
