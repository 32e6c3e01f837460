"""The error contract: libraries raise a `UsageError`; an entry point's `main`, wrapped by `entry_point`, turns it
into one line `<prog>: error: <what> (<how to fix>)` and its exit code, never a traceback.

So the same library function is safe to call from a test, a benchmark or another tool; only `main` decides how
the process ends.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command stopped by Ctrl-C."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: the reader of our output went away (`... | head`); nothing to report."""

REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""What a filesystem refuses for reasons the user can fix: a full disk or quota, a read-only mount, permissions."""


class UsageError(Exception):
    """Bad input, or a problem with the machine the user can fix: what went wrong and how to fix it, in one line.

    `code` is the process's exit code when it ends a command (2 unless a subclass says otherwise); `prog`, when
    set, names the (sub)command that raised it, as argparse's subparsers do."""

    code = EXIT_USAGE

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


def refusal(error: OSError, out: Path | str | None = None) -> str | None:
    """One line for an OSError the user can fix (full disk, read-only, permission), naming the path; else None.
    `out`: the folder the command writes to, named first when the disk is full."""
    if error.errno not in REFUSALS:
        return None
    path, where = error.filename, out or error.filename
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        writing = f" (writing {path})" if path and str(path) != str(where) else f" ({error.strerror})"
        return (f"the disk holding {where} is full{writing}: free some space and run the same command again"
                if where else f"a disk is full ({error.strerror}): free some space and run the same command again")
    if error.errno == errno.EROFS:
        return f"cannot write {path or 'a file'}: {error.strerror} (choose a writable folder)"
    return f"no permission for {path or 'a file'}: {error.strerror} (fix its permissions, or choose another path)"


def report(prog: str, message: str) -> None:
    """`prog: error: ...` on stderr, one line per line of `message`, from the first process of a job only (every
    rank of a multi-process run finds the same problem)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for line in message.splitlines() or [""]:
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)


def entry_point(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a command's `main(argv=None)`: it returns the exit code instead of raising. A UsageError is one
    line and its code; a full disk, read-only folder or permission error is one line naming the path and 2;
    Ctrl-C is one line and 130; a closed pipe (`| head`) ends quietly with 141. Anything else is a bug and keeps
    its traceback."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except UsageError as e:
                report(e.prog or prog, str(e))
                return e.code
            except BrokenPipeError:
                # Python's advice: point stdout at devnull so the flush at exit does not raise again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return EXIT_BROKEN_PIPE
            except OSError as e:
                message = refusal(e)
                if message is None:
                    raise
                report(prog, message)
                return EXIT_USAGE
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED

        return run

    return wrap
