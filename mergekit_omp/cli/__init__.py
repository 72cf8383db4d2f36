"""The click commands, one module per console script; ``common`` holds what they share.

The console scripts are ``common``'s entry points (see ``[project.scripts]`` in
pyproject.toml), which import their command only when run.
"""
