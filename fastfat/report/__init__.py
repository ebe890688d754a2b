"""Reporting: a sweep's results database read back (report) as the paper's tables and the tables
beyond them (seeds, methods_table, rendered by tables), figures (figures) and one page (html),
with one home for how methods, models and radii are named (labels)."""
