"""Transplant diagnostics: number-tokenization mismatch and the breaker-token audit.

- ``numbers``: each tokenizer's number scheme, whether base and donor agree, and how many
  numeric donor tokens were approximated rather than matched.
- ``audit``: per approximated row, donor residual, coefficient L1, anchor conditioning,
  base-row norm z-score and LM-head salience; outliers are flagged (arXiv 2601.00065).
- ``guard``: ``--guard clip|shrink|off`` for the flagged rows.
- ``records``: their typed records in the report (``Diagnostics``, ``AuditRecord``,
  ``GuardRecord``, ...), serialised to the report's JSON.
- ``stage``: the transplant stage running them; ``summary``: the report's readable lines;
  ``plot``: a PNG of the distributions; ``cli``: ``mergekit-omp-report BASE DONOR``.

Submodules are imported where used (``report.py`` reads ``summary``, which must not pull in
the pipeline).
"""
