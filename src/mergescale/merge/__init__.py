"""Streaming, data-free model merging.

    from mergescale.merge import MergeRequest, run_merge
    run_merge(MergeRequest(method="ties", base=..., experts=[...], out_dir=..., params={...}))

Importing this package imports every module in `merge/methods/`, which registers the
methods; `list_methods()` then lists them all.
"""

import importlib
import pkgutil

from mergescale.merge import methods as _methods
from mergescale.merge.engine import MergeRequest, MergeResult, run_merge
from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import (
    Hyperparameter,
    MergeMethod,
    ResolvedParams,
    get_method,
    list_methods,
    register_method,
    validate_params,
)

# The one place methods are discovered: every module in merge/methods/.
for _module in sorted(m.name for m in pkgutil.iter_modules(_methods.__path__)):
    importlib.import_module(f"{_methods.__name__}.{_module}")

__all__ = [
    "Hyperparameter",
    "MergeInputError",
    "MergeMethod",
    "MergeRequest",
    "MergeResult",
    "ResolvedParams",
    "get_method",
    "list_methods",
    "register_method",
    "run_merge",
    "validate_params",
]
