"""`fastfat report`'s report.html: one self-contained page (figures as data URIs, no scripts, no
network) that opens with the answer, then the paper's tables and the rest, wide tables split.

The answer, under the report's attack (the strongest the database has unless chosen): the verdict
sentences (verdicts.py) at its eps_test, the fairness scatter (worst class against average) with
its caption, then per data set, model and eps_test each method's average, worst-class and k-worst
robust accuracy and var with the 95% seed interval of the mean, and its paired difference against
its base method (seeds.py). Every figure is shown at its own size (800 px wide) with its caption.
"""
from __future__ import annotations

import base64
import html
import os

from .labels import attack_title, dataset_name, eps_label, method_label, method_name, model_name
from .seeds import LEVEL, ordered
from .tables import Table, fmt

MAX_PX = 1150   # the widest displayed table (px; text stays 1150 wide, figures use up to 1880): wider ones are split

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1880px;padding:0 16px;color:#222}
p,ul{max-width:1150px}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em;margin:1.4em 0 .3em}
table{border-collapse:collapse;margin:.3em 0 1em;font-size:12.5px;max-width:100%}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f3f3f3}
td.s,th.s{text-align:left}p.c{color:#555;font-size:12px;margin:.2em 0;max-width:1100px}
figure{margin:.5em 0 1.2em;width:800px;max-width:100%}
figure img{width:800px;max-width:100%;height:auto;display:block}
figcaption{color:#555;font-size:12px;margin-top:.2em}.figs{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}
nav a{margin-right:1em}ul.v{margin:.3em 0;padding-left:1.2em}ul.v li{margin:.15em 0}
.lead{display:flex;flex-wrap:wrap;gap:0 32px;align-items:flex-start}.lead #verdicts{flex:1 1 600px;max-width:1000px}
details{margin:.2em 0 .6em}.ok{color:#075}.warn{color:#a40}
"""


MAX_VERDICTS = 8   # verdicts shown on the first screen; the rest one click away (<details>)


def _interval(mean: float, lo: float, hi: float, scale: float, digits: int) -> str:
    m = fmt(scale * mean, digits)
    if m == "-" or fmt(lo, digits) == "-":
        return m
    return f"{m} [{fmt(scale * lo, digits)}, {fmt(scale * hi, digits)}]"


def _difference(r, m: str, scale: float, digits: int) -> str:
    """A paired difference with its interval, bold (<b>) when the interval excludes 0."""
    if r is None:
        return ""
    text = html.escape(_interval(getattr(r, f"d_{m}"), getattr(r, f"d_{m}_lo"), getattr(r, f"d_{m}_hi"), scale, digits))
    lo, hi = getattr(r, f"d_{m}_lo"), getattr(r, f"d_{m}_hi")
    return f"<b>{text}</b>" if lo == lo and hi == hi and (lo > 0 or hi < 0) else text


def answer_html(data, attack: str) -> str:
    """The answer's tables (HTML) under `attack`: per setting, data set, model and eps_test, last
    checkpoint."""
    stats = ordered(data.stats, data.attacks)
    stats = stats[(stats.attack == attack) & (stats.checkpoint == "last")]
    paired = {}
    if not data.paired.empty:
        for r in data.paired[(data.paired.attack == attack) & (data.paired.checkpoint == "last")].itertuples(index=False):
            paired[(r.setting, r.dataset, r.model, r.method, r.lam, r.eps_train, r.eps)] = r
    k = int(data.runs.worst_k.iloc[0]) if "worst_k" in data.runs and len(data.runs) else 3
    out = [f"<p>Under <b>{html.escape(attack_title(attack))}</b>, last checkpoint. Each cell: mean over seeds [{LEVEL:.0%} interval of the mean]; "
           f"avg, worst and {k}-worst in %, var in 10^-2. diff: the method minus its base method, "
           f"seed by seed, with its interval; <b>bold</b>: the interval excludes 0 (the seeds support "
           f"the difference).</p>"]
    head = ["method", "eps_train", "seeds", "avg", "worst", f"{k}-worst", "var",
            "diff avg", "diff worst", "diff var", "vs"]
    for (setting, dataset, model, eps), g in stats.groupby(["setting", "dataset", "model", "eps"], sort=False):
        tag, _ = data.tag(setting)
        out.append(f"<h3>{html.escape(dataset_name(dataset))}, {html.escape(model_name(model))}, "
                   f"eps_test {html.escape(eps_label(eps))}{html.escape(tag)}</h3>")
        rows = []
        for r in g.itertuples(index=False):
            d = paired.get((setting, dataset, model, r.method, r.lam, r.eps_train, r.eps))
            cells = [_interval(getattr(r, m), getattr(r, f"{m}_lo"), getattr(r, f"{m}_hi"), s, dg)
                     for m, s, dg in (("avg_acc", 100, 1), ("worst_acc", 100, 1), ("worst_k_acc", 100, 1), ("vcra", 100, 2))]
            rows.append([html.escape(method_label(r.method, r.lam, greek=True)), html.escape(eps_label(r.eps_train)), str(r.n)]
                        + [html.escape(c) for c in cells]
                        + [_difference(d, "avg_acc", 100, 1), _difference(d, "worst_acc", 100, 1),
                           _difference(d, "vcra", 100, 2), html.escape(method_name(d.base)) if d is not None else ""])
        out.append(_plain_table(head, rows, stub=2))
    return "\n".join(out)


def _plain_table(head: list[str], rows: list[list[str]], stub: int) -> str:
    """rows of already-escaped cells under one header row; the first `stub` columns left-aligned."""
    th = "".join(f'<th class="{"s" if i < stub else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"s" if i < stub else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _width(texts: list[str]) -> int:
    """A column's rough width in px at the page's table font (about 7 px a character + padding)."""
    return 7 * max((len(t) for t in texts), default=1) + 14


def column_parts(t: Table, max_px: int = MAX_PX) -> list[list[int]]:
    """The value columns of t in displayed parts no wider than max_px with the stub repeated in
    each (at least one column a part), cut at the top header level's group boundaries where they
    fit, so a laptop screen shows each part without horizontal scrolling."""
    cells = t.cells("{}")
    stub = sum(_width([h] + [r[i] for r in t.stub_rows()]) for i, h in enumerate(t.stub))
    names = t.columns()
    width = [_width([names[c].split(" ")[-1]] + [r[c] for r in cells]) for c in range(len(t.digits))]
    room = max(max_px - stub, max(width, default=0))
    groups, start = [], 0
    for _, span in (t.header[0] if t.header else [("", len(t.digits))]):
        groups.append(list(range(start, start + span)))
        start += span
    parts, cur = [], []
    for g in groups:
        if cur and sum(width[c] for c in cur + g) > room:   # the group starts a new part
            parts.append(cur)
            cur = []
        for c in g:   # a group wider than a part is cut
            if cur and sum(width[i] for i in cur) + width[c] > room:
                parts.append(cur)
                cur = []
            cur.append(c)
    if cur:
        parts.append(cur)
    return parts


def _header_rows(t: Table, cols: list[int]) -> list[list[tuple[str, int]]]:
    """t's header levels restricted to the columns cols (spans recounted)."""
    out = []
    for level in t.header:
        owner = [text for text, span in level for _ in range(span)]
        row = []
        for c in cols:
            if row and row[-1][0] == owner[c] and row[-1][2] == c - 1:
                row[-1] = (owner[c], row[-1][1] + 1, c)
            else:
                row.append((owner[c], 1, c))
        out.append([(text, span) for text, span, _ in row])
    return out


def table_html(t: Table, max_px: int = MAX_PX) -> str:
    """t as one or more HTML tables (the stub repeated in each part), with its title and caption."""
    texts = t.cells("{}")
    stubs = t.stub_rows()
    parts = column_parts(t, max_px)
    out = [f"<h3 id=\"{html.escape(t.slug)}\">{html.escape(t.title)}</h3>", f'<p class="c">{html.escape(t.caption)}</p>']
    for i, cols in enumerate(parts):
        levels = _header_rows(t, cols)
        head = []
        for j, level in enumerate(levels):
            stub = "".join(f'<th class="s" rowspan="{len(levels)}">{html.escape(s)}</th>' for s in t.stub) if j == 0 else ""
            head.append("<tr>" + stub + "".join(f'<th colspan="{span}">{html.escape(text)}</th>'
                                                for text, span in level) + "</tr>")
        body = []
        for stub, vals, (_, _, marks) in zip(stubs, texts, t.rows):
            cells = []
            for c in cols:
                v = html.escape(vals[c])
                cells.append(f"<td><b>{v}</b></td>" if marks[c] and vals[c] != "-" else f"<td>{v}</td>")
            body.append("<tr>" + "".join(f'<td class="s">{html.escape(s)}</td>' for s in stub) + "".join(cells) + "</tr>")
        if len(parts) > 1:
            out.append(f'<p class="c">part {i + 1} of {len(parts)}</p>')
        out.append(f"<table><thead>{''.join(head)}</thead><tbody>{''.join(body)}</tbody></table>")
    return "\n".join(out)


def data_uri(png_path: str) -> str:
    with open(png_path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _figure(png_path: str, stem: str, caption: str) -> str:
    """A figure at its own size (800 px wide, height from its aspect) with its caption under it."""
    return (f'<figure id="{html.escape(stem)}"><img src="{data_uri(png_path)}" alt="{html.escape(stem)}" '
            f'width="800"><figcaption>{html.escape(caption)}</figcaption></figure>')


def verdicts_html(said: list[str], attack: str, eps: float) -> str:
    """The verdict sentences: the first MAX_VERDICTS as a list, any more behind a <details>."""
    from .verdicts import heading
    if not said:
        return ""
    items = [f"<li>{html.escape(v)}</li>" for v in said]
    more = items[MAX_VERDICTS:]
    return (f'<div id="verdicts"><p class="c">{html.escape(heading(attack, eps))}</p>'
            f'<ul class="v">{"".join(items[:MAX_VERDICTS])}</ul>'
            + (f'<details><summary>{len(more)} more verdicts</summary><ul class="v">{"".join(more)}</ul></details>'
               if more else "") + "</div>")


def render(data, tables: list[Table], figures: dict[str, str], captions: dict[str, str], sections,
           intro: list[str], said: list[str], chosen: tuple[str, float], runs_md: str, guard_md: str = "") -> str:
    """The page. figures: stem -> PNG path (embedded); captions: stem -> its caption; sections:
    (heading, slug prefix or prefixes) in report.md's order; intro: report.md's opening sentences
    (plain text); said: the verdict sentences; chosen: the report's (attack, eps_test)."""
    attack, eps = chosen
    scatter = {s: p for s, p in figures.items() if s.startswith("fig_fairness_")}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>fastfat sweep report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>fastfat sweep report</h1>", '<nav><a href="#answer">answer</a><a href="#about">about</a>'
             '<a href="#tables">tables</a><a href="#figures">figures</a><a href="#runs">runs</a></nav>',
             f'<h2 id="answer">The answer under {html.escape(attack_title(attack))}: which method is fairer, '
             f'at what cost, how sure</h2>',
             # the verdicts and the scatter side by side where the screen is wide enough (1920 px:
             # the answer table then starts on the first screen too), one above the other if not
             '<div class="lead">' + verdicts_html(said, attack, eps)
             + "".join(_figure(p, s, captions[s]) for s, p in scatter.items()) + "</div>",
             answer_html(data, attack),
             '<h2 id="about">About this report</h2>', "".join(f"<p>{html.escape(line)}</p>" for line in intro)]
    if guard_md:   # the epochs the catastrophic-overfitting guard flagged (fastfat.report.co_flags)
        head, _, body = guard_md.partition("\n")
        parts += [f'<h2 id="guard">{html.escape(head.lstrip("# "))}</h2>', _runs(body)]
    parts.append('<h2 id="tables">Tables</h2>')
    for heading, prefix in sections:
        ts = [t for t in tables if t.slug.startswith(prefix)]
        if ts:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            parts += [table_html(t) for t in ts]
    rest = {s: p for s, p in figures.items() if s not in scatter}
    parts += ['<h2 id="figures">Figures</h2>', '<div class="figs">'
              + "".join(_figure(p, s, captions[s]) for s, p in rest.items()) + "</div>",
              '<h2 id="runs">Runs</h2>', _runs(runs_md), "</body></html>"]
    return "\n".join(parts)


def _runs(md: str) -> str:
    """report.md's runs table (Markdown pipes) as HTML."""
    lines = [l for l in md.strip().splitlines() if l.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(md)}</p>"
    cells = [[html.escape(c.strip()) for c in l.strip().strip("|").split("|")] for l in lines]
    return _plain_table([html.unescape(c) for c in cells[0]], cells[2:], stub=6)


def write_html(data, tables, figure_paths: dict[str, str], captions: dict[str, str], sections, intro,
               said: list[str], chosen: tuple[str, float], runs_md, out_dir: str, guard_md: str = "") -> str:
    """Write out_dir/report.html (atomically); returns its path."""
    from ..files import atomic_write_text
    path = os.path.join(out_dir, "report.html")
    atomic_write_text(path, render(data, tables, figure_paths, captions, sections, intro, said, chosen, runs_md,
                                    guard_md))
    return path
