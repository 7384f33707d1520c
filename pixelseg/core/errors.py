"""One exception type for problems the user can fix (bad data, bad flags, missing files).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class PixelsegError(Exception):
    """A user-facing error: the message names the file or flag and says how to fix it."""
