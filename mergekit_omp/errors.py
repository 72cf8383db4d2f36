"""The one error type a user sees as a single line from the command line tools."""


class TransplantError(Exception):
    """Bad input or an impossible request, explained in one sentence."""
