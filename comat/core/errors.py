"""User-facing errors.

A ``ComatError`` carries a single line that names the offending thing and the fix. The CLI prints
it without a traceback; library users can catch it like any exception.
"""


class ComatError(Exception):
    """Bad input or an unavailable resource, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
