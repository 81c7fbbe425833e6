"""Command-line plumbing shared by every tool: user errors become one line and a non-zero exit."""

import os
import sys

# Errors the user can fix from the message alone; anything else is a bug and keeps its traceback.
# FloatingPointError: a run stopped by the non-finite guard (it names what went bad).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, ImportError, PermissionError,
               FloatingPointError, MemoryError)


def run_cli(main, *args, **kwargs) -> None:
    try:
        main(*args, **kwargs)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        rank = os.environ.get("RANK")
        prefix = f"error (rank {rank}): " if rank not in (None, "0") else "error: "
        print(f"{prefix}{message}", file=sys.stderr, flush=True)
        sys.exit(2)
