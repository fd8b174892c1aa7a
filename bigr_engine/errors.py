"""User-facing errors.

Everything the engine raises because of what a user passed (a wrong file, a mismatched bit width, a
class out of range, a wrong image size) is a ``BigrError``: its message is one line that names the
problem and the fix. The CLI prints it and exits with status 2; other exceptions are bugs.
"""


class BigrError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class CheckpointError(BigrError):
    """A checkpoint file is missing, unreadable, or does not match the model it is loaded into."""
