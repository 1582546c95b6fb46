"""One model's scores.json out of a batched evaluation's file.

    python -m mergescale.evaluate.batch_member BATCH_JSON MODEL_DIR OUT_JSON

Kept free of heavy imports (torch, lm-eval): the workflow runs it once per batched model
as a shell command, which starts in a tenth of a second where a Python rule would parse
the whole workflow again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergescale.io_utils import atomic_write_json


def write_batch_member(batch_file: Path, model_dir: str, out: Path) -> None:
    """Write one model's result from a batch file (evaluate.evaluate_batch_and_save) as
    its own scores.json, the file a one-model evaluation writes."""
    models = json.loads(Path(batch_file).read_text())["models"]
    if str(model_dir) not in models:
        raise KeyError(f"{batch_file}: no result for {model_dir} (it holds {', '.join(sorted(models))})")
    atomic_write_json(Path(out), models[str(model_dir)])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    write_batch_member(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
