"""Errors a user sees as one line: each names the config key, file or tensor at fault.

Imports nothing of ours, so any module can raise them without pulling in another.
"""


class ConfigError(ValueError):
    """The workflow config is wrong; the message starts with the config key."""
