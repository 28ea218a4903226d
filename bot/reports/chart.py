"""The digest chart: first responses per day against the deadline, missed deadlines marked.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global state,
safe in the scheduler's threads). It is made to be read as Slack's preview, about 360 px
wide: a 720 x 400 px PNG (so the preview halves it), large type, and only a few elements:

* one bar per day: the median share of the time allowed that the day's first responses used
  (response time on the policy's clock / its target, so 100 % is exactly on the deadline;
  teams with several policies or weekend targets share one scale);
* one dot per first response over the bar, so a day's spread shows without a legend; late
  ones red (on a business clock a late answer given after hours sits exactly on 100 %);
* a dashed line at 100 %, labelled "deadline";
* a red "✕ n" above a day on which n deadlines passed unanswered ("missed" at the row's end);
* a response beyond the scale (over 300 %) as a caret at the top edge.
"""

from __future__ import annotations

import io

from bot.reports.digest import Digest

WIDTH_INCHES, HEIGHT_INCHES, DPI = 6.4, 3.6, 100
ON_TIME = "#2f6db5"
LATE = "#c8323c"
DOT = "#1b1b1b"
LATE_DOT = "#e0301e"
INK = "#222222"
MUTED = "#8a8a8a"
# The y axis shows at least 0-150 % and at most 0-300 %; taller bars are cut and labelled.
Y_MIN_TOP, Y_MAX_TOP = 1.5, 3.0
DAY_LABELS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
TITLE_LIMIT = 30


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def render_chart(digest: Digest) -> bytes:
    """The chart of the digest's week as PNG bytes."""
    # matplotlib is imported when a chart is drawn (once a week), not when `run` starts: it is
    # half of the start-up's imports, and a restarted process must take over a dead one's
    # messages within seconds, even on a loaded machine.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figures = digest.current
    figure = Figure(figsize=(WIDTH_INCHES, HEIGHT_INCHES), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.14, 0.13, 0.70, 0.64))
    figure.text(
        0.02,
        0.97,
        f"{_clip(digest.team_label, TITLE_LIMIT)} \u00b7 {figures.week.label}",
        fontsize=22,
        fontweight="bold",
        color=INK,
        va="top",
    )
    figure.text(
        0.02,
        0.80,
        "first responses, % of time allowed; bar = median",
        fontsize=16,
        color=MUTED,
        va="bottom",
    )

    used_all = [value for day in figures.days for value in day.used]
    highest = max([*(day.median_used or 0.0 for day in figures.days), *used_all, 0.0])
    top = min(max(Y_MIN_TOP, highest * 1.15), Y_MAX_TOP)
    positions = list(range(len(figures.days)))

    for position, day in zip(positions, figures.days, strict=True):
        if day.median_used is not None:
            height = min(day.median_used, top)
            colour = LATE if day.median_used > 1.0 else ON_TIME
            axes.bar(position, height, width=0.66, color=colour, zorder=2)
            if day.median_used > top:
                axes.text(
                    position,
                    top * 0.97,
                    f"{day.median_used:.0%}",
                    ha="center",
                    va="top",
                    fontsize=12,
                    color="white",
                    fontweight="bold",
                    zorder=4,
                )
            for late in (False, True):
                values = [v for v, ok in zip(day.used, day.on_time, strict=True) if ok != late]
                inside = [value for value in values if value <= top]
                colour = LATE_DOT if late else DOT
                axes.scatter(
                    [position] * len(inside),
                    inside,
                    s=44 if late else 30,
                    color=colour,
                    alpha=0.95 if late else 0.6,
                    linewidths=0,
                    zorder=4,
                )
                if len(values) > len(inside):
                    # Off the scale: a caret at the top edge, so the dot is not read as a value.
                    beyond = len(values) - len(inside)
                    axes.scatter(
                        [position] * beyond, [top] * beyond, s=60, marker="^", color=colour, zorder=4
                    )
        if day.missed:
            axes.text(
                position,
                top * 1.04,
                f"\u2715{day.missed}",
                ha="center",
                va="bottom",
                fontsize=19,
                fontweight="bold",
                color=LATE,
                zorder=5,
            )

    right = len(positions) - 0.4 + 0.12
    if any(day.missed for day in figures.days):
        axes.text(right, top * 1.04, "missed", fontsize=16, color=LATE, va="bottom", ha="left", clip_on=False)
    axes.axhline(1.0, color=INK, linestyle=(0, (5, 3)), linewidth=2, zorder=3)
    axes.text(
        right,
        1.0,
        "deadline",
        fontsize=16,
        color=INK,
        va="center",
        ha="left",
        clip_on=False,
    )
    if not used_all:
        axes.text(
            (len(positions) - 1) / 2,
            top * 0.4,
            "no first responses this week",
            ha="center",
            va="center",
            fontsize=17,
            color=MUTED,
        )

    axes.set_xlim(-0.6, len(positions) - 0.4)
    axes.set_ylim(0, top * 1.22)
    axes.set_xticks(positions, DAY_LABELS[: len(positions)])
    ticks = [0.0, 1.0] + ([2.0] if top >= 2.0 else [])
    axes.set_yticks(ticks)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:.0%}"))
    axes.tick_params(axis="both", labelsize=17, colors=INK, length=0, pad=6)
    axes.grid(axis="y", color="#e4e4e4", linewidth=1, zorder=0)
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    axes.spines["bottom"].set_color(MUTED)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()
