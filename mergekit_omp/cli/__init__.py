"""The click commands, one module per console script (``transplant``, ``recipe``,
``evaluate``, ``merge``, ``report``, ``check``), and what they share: ``options`` (the flags),
``outputs`` (output checks, the summary), ``process`` (the error and exit contract, the
entry points, the process tuning).

The console scripts are ``process``'s entry points (see ``[project.scripts]`` in
pyproject.toml), which import their command only when run.
"""
