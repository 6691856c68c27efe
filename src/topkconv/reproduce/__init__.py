"""Reproduce the paper's tables, over seeds, with intervals and a verdict on each of the paper's claims.

* :mod:`.spec`: the table-spec format (``topkconv/experiments/<table>-<preset>.toml``) and :class:`Study`, where
  every run's spec is built (column, seed, command-line overrides).
* :mod:`.workspace`: :class:`Workspace`, the run and evaluation cache (``runs/<hash>/``), which plans the
  missing :class:`Job` s and runs one (:func:`execute`).
* :mod:`.jobs`: ``--jobs N`` worker processes, one progress line per job.
* :mod:`.measures`, :mod:`.stats`: per-example outcomes, intervals over seeds (t, exact at the edges), the verdicts and Holm.
* :mod:`.tables`, :mod:`.claims`, :mod:`.paper_figures`: the reports.
* :mod:`.driver` (:func:`reproduce`) and :mod:`.sweep` (:func:`sweep`): what the command line calls.
"""

from .driver import cli_overrides, reproduce
from .spec import (PAPER_TABLES, PRESETS, TABLES, TARGETS, ColumnSpec, FiguresSpec, Study, TableSpec,
                   experiments_dir, load_table_spec, merge, spec_path)
from .sweep import sweep
from .workspace import Job, Workspace

__all__ = ["reproduce", "sweep", "cli_overrides", "Study", "TableSpec", "ColumnSpec", "FiguresSpec", "Workspace",
           "Job", "load_table_spec", "merge", "spec_path", "experiments_dir", "TABLES", "PAPER_TABLES", "TARGETS",
           "PRESETS"]
