"""The one error type users see: a one-line message naming the file or setting and what to do."""


class PldistillError(Exception):
    """Bad input or state that the user can fix; the CLI prints it as one line and exits non-zero."""
