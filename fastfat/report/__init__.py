"""Reporting: a sweep's results database read back (report) as the paper's tables (paper) and the
tables beyond them (seeds, methods_table; rendered by tables), the verdicts (verdicts), figures
(figures, drawn by plots) and one page (html), all under one attack, with one home for how
methods, models and radii are named (labels) and for a sweep file's [report] table (settings)."""
