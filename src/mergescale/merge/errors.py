"""The one exception a bad merge input raises."""


class MergeInputError(ValueError):
    """An input checkpoint, configuration or hyperparameter cannot be merged.

    The message names the offending file, key or tensor; callers (the CLI, the
    workflow) print it as one line without a traceback.
    """
