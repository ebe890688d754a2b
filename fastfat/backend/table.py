"""The class-wise table of evaluation records (eval.json's, evaluate_model's, fastfat.AutoAttack's):
per class its sample count and accuracy under each (attack, eps), then the average, the worst
class and VCRA (x10^-2, the paper's unit)."""
from __future__ import annotations

import math


def _title(rec: dict) -> str:
    from ..evaluate import attack_title, eps_label
    return "clean" if rec["attack"] == "clean" else f"{attack_title(rec['attack'])} {eps_label(rec['eps'])}"


def classwise_report(records: list[dict], class_names=None, print_it: bool = True) -> str:
    """The table of records (dicts with attack, eps, class_acc [C] fractions or None,
    class_count [C], avg_acc, worst_acc, vcra), one column per record: per-class accuracy (%),
    then avg (%), the worst class (% and which), VCRA (x10^-2). Printed unless print_it is
    False; returned either way. class_names: C labels for the rows (default 0 .. C-1)."""
    if not records:
        raise ValueError("classwise_report: no records")
    n_cls = len(records[0]["class_acc"])
    names = [str(c) for c in (class_names if class_names is not None else range(n_cls))]
    counts = records[0].get("class_count", [None] * n_cls)
    head = ["class", "n"] + [_title(r) for r in records]
    rows = []
    for c in range(n_cls):
        cells = [f"{100 * r['class_acc'][c]:.1f}" if r["class_acc"][c] is not None else "-" for r in records]
        rows.append([names[c], "" if counts[c] is None else str(counts[c])] + cells)
    def worst(r):
        present = [(a, i) for i, a in enumerate(r["class_acc"]) if a is not None and math.isfinite(a)]
        a, i = min(present) if present else (float("nan"), -1)
        return f"{100 * a:.1f} ({names[i]})" if i >= 0 else "-"
    total = sum(c for c in counts if c is not None) if counts[0] is not None else ""
    rows.append(["avg", str(total)] + [f"{100 * r['avg_acc']:.1f}" for r in records])
    rows.append(["worst", ""] + [worst(r) for r in records])
    rows.append(["VCRA x10^-2", ""] + [f"{100 * r['vcra']:.2f}" for r in records])
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    fmt = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
    rule = "-" * len(fmt(head))
    text = "\n".join(["class-wise accuracy (%)", fmt(head), rule] + [fmt(r) for r in rows[:n_cls]] + [rule]
                     + [fmt(r) for r in rows[n_cls:]])
    if print_it:
        print(text)
    return text
