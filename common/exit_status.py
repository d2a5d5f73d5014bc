"""How every entry point ends: one mapping from errors to exit statuses, the same for train/run.py
and the tools.

An error class that means a documented outcome carries its status as `exit_code` (UserInputError 2,
the non-finite errors 3, DiskFull 4, PeerTimeout 5, a stop after training 128 + N); such an error
ends the program with one line on stderr (`error: ...`) and that status, never a traceback. A file
that does not exist is a path the user gave: status 2 too. Any other error is a bug or a fault of
the machine: it propagates (traceback, status 1).
"""
from __future__ import annotations

import sys
from typing import Callable

from common.errors import UserInputError

Translate = Callable[[BaseException], "BaseException | None"]


def exit_code_of(error: BaseException, translate: Translate | None = None) -> tuple[int, str] | None:
    """(status, line to print) for an error with a documented status, else None. translate may turn a
    library's error into one of ours (gloo's timeout into PeerTimeout)."""
    error = (translate(error) if translate else None) or error
    if isinstance(error, FileNotFoundError):
        error = UserInputError(str(error))
    code = getattr(error, "exit_code", None)
    if not isinstance(code, int):
        return None
    return code, getattr(error, "exit_line", None) or f"error: {error}"


def run_entry_point(main: Callable[[list[str]], int | None], argv: list[str], translate: Translate | None = None) -> int:
    """main(argv)'s status (None counts as 0); a documented error printed as its one line, with its status."""
    try:
        return main(argv) or 0
    except Exception as error:
        outcome = exit_code_of(error, translate)
        if outcome is None:
            raise
        code, line = outcome
        print(line, file=sys.stderr)
        return code
