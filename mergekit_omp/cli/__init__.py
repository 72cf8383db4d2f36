"""The click commands, one module per console script; ``common`` holds what they share.

Each module's ``run`` is its console script (see ``[project.scripts]`` in pyproject.toml).
"""
