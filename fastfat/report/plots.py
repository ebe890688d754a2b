"""The report's drawing (matplotlib, Agg): one function per kind of figure (lines against
eps_train, the Pareto scatter, class-wise bars, the fairness scatter), every figure SIZE at DPI
(800 x 450 px), error bars where there is a spread, and point labels placed so none collide."""
from __future__ import annotations

from .labels import eps_label

SIZE = (8, 4.5)      # inches at DPI: every figure 800 x 450 px, shown at that size in report.html
DPI = 100
LABEL_PT = 7         # point labels' font size (points)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # A report makes all its figures before saving (and closing) each: a methods grid has dozens.
    plt.rcParams["figure.max_open_warning"] = 0
    return plt


def _has(errs) -> bool:
    return any(e == e for e in errs)   # some finite spread (NaN: a single seed)


ACC = (0.0, 100.0)    # an accuracy's range (%)
VAR = (0.0, None)     # a variance's


def _cut(vals, errs, bounds):
    """Asymmetric bars [[below], [above]]: +- err cut at the ends of the quantity's range (an
    accuracy cannot leave 0-100%, a variance cannot go below 0)."""
    lo, hi = bounds
    below = [min(e, v - lo) if e == e else e for v, e in zip(vals, errs)]
    above = [e if hi is None or e != e else min(e, hi - v) for v, e in zip(vals, errs)]
    return [below, above]


def error_bars(ax, xs, ys, yerr=None, xerr=None, color=None, ybounds=ACC, xbounds=ACC) -> None:
    """+- one standard deviation over seeds at each point, where there is one (NaN: none), cut to
    the range of the quantity on each axis (ybounds, xbounds: (low, high or None))."""
    yerr = _cut(ys, yerr, ybounds) if yerr is not None and _has(yerr) else None
    xerr = _cut(xs, xerr, xbounds) if xerr is not None and _has(xerr) else None
    if yerr is not None or xerr is not None:
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt="none", ecolor=color, elinewidth=1, capsize=0)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(ax, items: list[tuple[float, float, str]], size: float = LABEL_PT) -> None:
    """Label points (x, y, text in data units) so no two labels overlap each other or cover a
    point: each label takes the first free place around its point (right-up, right-down, left,
    above, below, further out). Call after the axes' limits and layout are final."""
    ax.autoscale_view()
    px = ax.figure.dpi / 72
    frame = ax.get_window_extent().extents
    at = [tuple(ax.transData.transform((x, y))) for x, y, _ in items]
    marks = [(X - 3, Y - 3, X + 3, Y + 3) for X, Y in at]
    taken = []
    for (x, y, text), (X, Y) in zip(items, at):
        w, h = 0.62 * size * px * len(text), 1.15 * size * px
        tries = [(dx, dy) for r in (1, 2, 3) for dx, dy in
                 ((4 * r, 3 * r), (4 * r, -h - 3 * r), (-w - 4 * r, 3 * r), (-w - 4 * r, -h - 3 * r),
                  (-w / 2, 5 * r), (-w / 2, -h - 5 * r), (7 * r, -h / 2), (-w - 7 * r, -h / 2))]
        tries += [(dx, dy + sign * k * (h + 2)) for k in range(1, 8) for sign in (1, -1)   # a stack
                  for dx, dy in ((4, 3), (-w - 4, 3), (-w / 2, 5))]

        def cost(d):   # another label covered weighs most, then a point, then leaving the axes
            box = (X + d[0], Y + d[1], X + d[0] + w, Y + d[1] + h)
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
            return (100 * sum(_overlap(box, b) for b in taken) + 10 * sum(_overlap(box, b) for b in marks)
                    + (0 if inside else 1))

        dx, dy = next((d for d in tries if cost(d) == 0), None) or min(tries, key=cost)
        taken.append((X + dx, Y + dy, X + dx + w, Y + dy + h))
        ax.annotate(text, (x, y), xytext=(dx / px, dy / px), textcoords="offset points",
                    fontsize=size, ha="left", va="bottom")


def _figure(ncols: int = 1):
    plt = pyplot()
    return plt.subplots(1, ncols, figsize=SIZE, dpi=DPI)


def plot_vs_eps(series: dict[str, list[tuple[float, float, float]]], title: str, errors: dict | None = None,
                limits: tuple | None = None, styles: dict | None = None):
    """var (10^-2) and rob.acc (%) against eps_train; series: label -> [(eps_train, var, acc)];
    errors: label -> [(var std, acc std)] in the same order (NaN where one seed), drawn as bars;
    limits: ((var lo, hi), (acc lo, hi)) to share axes across split figures; styles: label ->
    matplotlib line keywords (the gap view's dashed lines)."""
    fig, (ax_v, ax_a) = _figure(2)
    for label, pts in series.items():
        order = sorted(range(len(pts)), key=lambda i: pts[i])
        errs = [(errors or {}).get(label, [(float("nan"),) * 2] * len(pts))[i] for i in order]
        pts = [pts[i] for i in order]
        xs = [p[0] for p in pts]
        style = {"marker": "o", **(styles or {}).get(label, {})}
        (lv,) = ax_v.plot(xs, [p[1] for p in pts], label=label, **style)
        (la,) = ax_a.plot(xs, [p[2] for p in pts], label=label, **style)
        error_bars(ax_v, xs, [p[1] for p in pts], [e[0] for e in errs], color=lv.get_color(), ybounds=VAR)
        error_bars(ax_a, xs, [p[2] for p in pts], [e[1] for e in errs], color=la.get_color())
    ax_v.set_ylabel("var of class-wise rob. acc (10$^{-2}$)")
    ax_a.set_ylabel("average robust accuracy (%)")
    for ax, lim in zip((ax_v, ax_a), limits or (None, None)):
        ax.set_xlabel(r"$\epsilon_{train}$")
        ax.grid(alpha=0.3)
        if lim:
            ax.set_ylim(*lim)
    ax_a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (var, acc) points no other point beats on both (lower var and higher acc), by var."""
    front = [p for p in points
             if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)]
    return sorted(set(front))


def plot_pareto(series: dict[str, list[tuple[float, float, float]]], title: str, errors: dict | None = None):
    """rob.acc (%) against var (10^-2); series: label (e.g. per lambda) -> [(eps_train, var, acc)].
    Each point is labelled with its eps_train; the Pareto front over all points is a line. errors:
    as plot_vs_eps's, bars along both axes."""
    fig, ax = _figure()
    allpts, names = [], []
    for label, pts in series.items():
        dots = ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=label, s=30)
        errs = (errors or {}).get(label)
        if errs:
            error_bars(ax, [p[1] for p in pts], [p[2] for p in pts], [e[1] for e in errs], [e[0] for e in errs],
                       color=dots.get_facecolor()[0], xbounds=VAR)
        names += [(v, a, eps_label(e)) for e, v, a in pts]
        allpts += [(p[1], p[2]) for p in pts]
    front = pareto_front(allpts)
    ax.plot([p[0] for p in front], [p[1] for p in front], color="black", lw=1.2, ls="--",
            marker="o", mfc="none", ms=10, label="Pareto front")
    ax.set_xlabel("var of class-wise rob. acc (10$^{-2}$), lower is fairer")
    ax.set_ylabel("average robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=r"labels: $\epsilon_{train}$", title_fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    place_labels(ax, names)
    return fig


def plot_classwise(names: list[str], series: dict[str, list[float]], title: str, errors: dict | None = None):
    """Grouped bars: robust accuracy (%) per class, one bar series per label (eps_train); errors:
    label -> each class's std over seeds (NaN where one seed), drawn on the bars."""
    fig, ax = _figure()
    k = max(1, len(series))
    width = 0.8 / k
    for i, (label, vals) in enumerate(series.items()):
        xs = [c + (i - (k - 1) / 2) * width for c in range(len(names))]
        ax.bar(xs, vals, width=width, label=label)
        error_bars(ax, xs, vals, (errors or {}).get(label), color="black")
    ax.set_xticks(range(len(names)))
    long = max(len(n) for n in names) > 3 or len(names) > 20
    ax.set_xticklabels(names, rotation=45 if long else 0, ha="right" if long else "center",
                       fontsize=8 if len(names) <= 20 else 6)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlabel("class")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, title=r"$\epsilon_{train}$", title_fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_fairness(series: dict[str, list[tuple]], title: str, limits: tuple | None = None, colors: dict | None = None):
    """Worst-class against average robust accuracy (%) of every method; series: label ->
    [(eps_train, avg, worst, avg std, worst std)] (std NaN where one seed: no bars). Each point
    is labelled with its eps_train; a label's '(best)' twin takes its colour and another marker.
    limits: ((avg lo, hi), (worst lo, hi)) shared across split figures; colors: method -> colour."""
    plt = pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(label.removesuffix(" (best)") for label in series))
    colors = colors or {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}
    fig, ax = _figure()
    names = []
    for label, pts in series.items():
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        best = label.endswith(" (best)")   # the method's colour, another marker
        color = colors[label.removesuffix(" (best)")]
        ax.scatter(xs, ys, label=label, s=30, marker="D" if best else "o", color=color)
        error_bars(ax, xs, ys, [p[4] for p in pts], [p[3] for p in pts], color=color)
        names += [(p[1], p[2], eps_label(p[0])) for p in pts]
    ax.set_xlabel("average robust accuracy (%)")
    ax.set_ylabel("worst-class robust accuracy (%)")
    ax.grid(alpha=0.3)
    if limits:
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    # beside the plot, where it covers no point
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              title=r"labels: $\epsilon_{train}$", title_fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    place_labels(ax, names)
    return fig
