"""Errors a user sees as one line: each names the config key, file or tensor at fault.

Imports nothing of ours, so any module can raise them without pulling in another.
"""


class ConfigError(ValueError):
    """The workflow config is wrong; the message starts with the config key."""


def did_you_mean(name: object, known, n: int = 3) -> str:
    """' (did you mean a, b?)' for the known names close to ``name``, else ''. The one
    close-match hint of every "unknown name" error (methods, rule-methods, keys, tasks)."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=n, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""
