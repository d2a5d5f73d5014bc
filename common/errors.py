"""The error that means "the user's input cannot run": entry points print it as one line and exit 2.

The bottom of the import graph: pipelines/, models/, train/ and tools/ all raise it, and it
imports nothing (so models/ need not import pipelines/, whose package imports torch and torchvision).
"""


class UserInputError(Exception):
    exit_code = 2  # common/exit_status.py: one line, exit 2, nothing written


class DataError(UserInputError):
    """An image cannot be read mid-run and nothing can stand in for it."""
