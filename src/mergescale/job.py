"""Job plumbing for workflow scripts: logging to the rule's `log:` file, thread budget."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def log_to(path: str | Path):
    """Send stdout and stderr (Python, warnings, tracebacks) to ``path`` line-buffered."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as fh:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        try:
            yield lambda msg: print(msg, flush=True)
        except BaseException:
            import traceback

            traceback.print_exc(file=fh)
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err


def set_threads(n: int) -> None:
    """Give torch the rule's `threads` (it would otherwise take every core)."""
    import torch  # imported here: data and report jobs need no torch

    torch.set_num_threads(max(1, int(n)))
