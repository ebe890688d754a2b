"""`fastfat report`'s tables as one neutral structure (Table: a stub, nested headers, numeric
cells with optional +- spreads), rendered three ways: Markdown (report.md), CSV and LaTeX."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Table:
    """A table with a stub (row labels) and value columns under nested headers.

    header: levels above the value columns, top first, each a list of (text, span); the last
    level names single columns. cells are numbers in display units (NaN or None when missing),
    formatted with each column's number of decimals; bold marks cells to emphasise. spread, when
    given, holds one list per row of each cell's +- (a standard deviation over seeds; NaN or
    None: none shown): Markdown and LaTeX print "mean +- std", the CSV adds a "<column> std"
    column after each value column. counts, when given, holds one list per row of the number of
    seeds behind each cell where it is fewer than the row's n (a statistic some seeds leave
    undefined; None: all of them): printed "(n=2)" after the cell, a "<column> n" CSV column.
    """
    slug: str
    title: str
    caption: str
    stub: list[str]
    header: list[list[tuple[str, int]]]
    digits: list[int]
    rows: list[tuple[list[str], list[float | None], list[bool]]] = field(default_factory=list)
    blank_repeats: bool = True   # print a repeated first stub value once per block (the paper's look)
    spread: list[list[float | None]] = field(default_factory=list)   # per row, like its values
    counts: list[list[int | None]] = field(default_factory=list)     # per row, like its values

    def columns(self) -> list[str]:
        """Flat names of the value columns, e.g. 'FGSM 16/255 var'."""
        per_column = ([text for text, span in level for _ in range(span)] for level in self.header)
        return [" ".join(parts) for parts in zip(*per_column)]

    def stub_rows(self) -> list[list[str]]:
        out, prev = [], None
        for stub, _, _ in self.rows:
            s = list(stub)
            if self.blank_repeats and len(s) > 1 and s[0] == prev:
                s[0] = ""
            else:
                prev = stub[0]
            out.append(s)
        return out

    def cells(self, bold: str, pm: str = " ± ") -> list[list[str]]:
        """Each row's value cells as printed, emphasised ones in `bold` ('**{}**'), each with its
        spread after `pm` when it has one."""
        out = []
        for i, (_, vals, marks) in enumerate(self.rows):
            spread = self.spread[i] if self.spread else [None] * len(vals)
            counts = self.counts[i] if self.counts else [None] * len(vals)
            row = []
            for v, d, b, sd, n in zip(vals, self.digits, marks, spread, counts):
                c = fmt(v, d)
                if c != "-" and fmt(sd, d) != "-":
                    c += pm + fmt(sd, d)
                if c != "-" and n is not None:
                    c += f" (n={n})"
                row.append(bold.format(c) if b and c != "-" else c)
            out.append(row)
        return out


def fmt(v: float | None, digits: int) -> str:
    """v with `digits` decimals; '-' when missing; never '-0.0' (a value that rounds to 0 is 0)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def render_markdown(t: Table) -> str:
    # By hand: DataFrame.to_markdown (tabulate's pipe format) pads every cell to its column's
    # width and sizes the alignment row to match; report.md's tables are unpadded ("| a | b |",
    # ":---"/"---:"), print a repeated model once per block and bold cells.
    head = t.stub + t.columns()
    lines = [f"**{t.title}.** {t.caption}", "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] * len(t.stub) + ["---:"] * len(t.digits)) + "|"]
    for stub, cells in zip(t.stub_rows(), t.cells("**{}**")):
        lines.append("| " + " | ".join(stub + cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
    """Every stub value repeated, 4 decimals (never -0.0000), empty for a missing cell; same units
    as the table; a column with spreads is followed by '<column> std', one with counts by
    '<column> n'."""
    names = t.columns()
    extras = [(e, suffix, [any(r[j] is not None for r in e) for j in range(len(names))])
              for e, suffix in ((t.spread, "std"), (t.counts, "n")) if e]   # (per row, name, has)
    head = [n for j, c in enumerate(names) for n in [c] + [f"{c} {sfx}" for _, sfx, has in extras if has[j]]]
    values = [[x for j, v in enumerate(vals) for x in [v] + [e[i][j] for e, _, has in extras if has[j]]]
              for i, (_, vals, _) in enumerate(t.rows)]
    frame = pd.concat([pd.DataFrame([s for s, _, _ in t.rows], columns=t.stub),
                       pd.DataFrame(values, columns=head, dtype=float).round(4) + 0.0], axis=1)
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.4f")


_TEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                "±": r"$\pm$"}
_TEX_HEADERS = {"eps_train": r"$\epsilon_{train}$", "eps_test": r"$\epsilon_{test}$"}


def _tex_text(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(s)).replace("lambda=", r"$\lambda$=")


def render_latex(t: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); headers span with \\multicolumn."""
    # By hand: DataFrame.to_latex (Styler) draws no \cmidrule under a spanning header (its
    # clines rule index groups with \cline), bolds with \bfseries rather than \textbf{}, and has
    # no $\lambda$ / $\epsilon_{train}$ headers, so it cannot give these files byte for byte.
    ns = len(t.stub)
    spec = "l" * ns + "r" * len(t.digits)
    out = ["% written by fastfat report; needs \\usepackage{booktabs}",
           r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{{_tex_text(t.title)}. {_tex_text(t.caption)}}}",
           rf"\label{{tab:{t.slug}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    for li, level in enumerate(t.header):
        last = li == len(t.header) - 1
        cells = [(_TEX_HEADERS.get(s, _tex_text(s)) if last else "") for s in t.stub]
        rules, col = [], ns + 1
        for text, span in level:
            cells.append(_tex_text(text) if span == 1 else rf"\multicolumn{{{span}}}{{c}}{{{_tex_text(text)}}}")
            if span > 1:
                rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
        out.append(" & ".join(cells) + r" \\")
        if rules:
            out.append(" ".join(rules))
    out.append(r"\midrule")
    for stub, cells in zip(t.stub_rows(), t.cells(r"\textbf{{{}}}", r" $\pm$ ")):
        out.append(" & ".join([_tex_text(s) for s in stub] + cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
