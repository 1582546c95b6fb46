"""Score models with lm-eval (the real harness, HF backend by default) on local tasks.

One process scores every requested task for a model, so lm-eval's start-up (imports,
task indexing) is paid once per model rather than once per task. Only our own task
directory is indexed (``include_defaults=False``): indexing lm-eval's hundreds of
built-in tasks would cost more than scoring a tiny model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from mergescale.tasks.lmeval_yaml import lm_eval_task_name

METRIC = "exact_match"
FILTER = "strip"


@dataclass(frozen=True)
class EvalRequest:
    model_dir: Path
    task_dir: Path  # directory of rendered task YAMLs
    tasks: tuple[tuple[str, str], ...]  # (task, split) pairs
    backend: str = "hf"  # "hf" or "vllm"
    device: str | None = None  # None: CUDA when present, else CPU
    batch_size: int = 64
    limit: int | None = None  # examples per task; None = the whole split
    seed: int = 0
    # Chat models: prompts go through the tokenizer's chat template (as in training);
    # generation stops at "\n" (the task's `until`) or at the end-of-turn token, which
    # lm-eval's HF backend adds to `until` as the tokenizer's EOS.
    apply_chat_template: bool = False


def _make_lm(req: EvalRequest):
    if req.backend == "hf":
        import torch
        from lm_eval.models.huggingface import HFLM

        device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return HFLM(pretrained=str(req.model_dir), device=device, batch_size=req.batch_size,
                    dtype="bfloat16" if device.startswith("cuda") else "float32")
    if req.backend == "vllm":
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(pretrained=str(req.model_dir), batch_size="auto", dtype="auto")
    raise ValueError(f"unknown evaluation backend {req.backend!r}; use 'hf' or 'vllm'")


def evaluate(req: EvalRequest, log=print) -> dict:
    """Run lm-eval on ``req.tasks`` and return tidy scores with per-example correctness."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    start = time.perf_counter()
    names = {lm_eval_task_name(t, s): (t, s) for t, s in req.tasks}
    manager = TaskManager(include_path=str(req.task_dir), include_defaults=False)
    missing = sorted(set(names) - set(manager.all_tasks))
    if missing:
        raise FileNotFoundError(f"no lm-eval task YAML in {req.task_dir} for: {', '.join(missing)}")
    lm = _make_lm(req)
    loaded = time.perf_counter()
    log(f"loaded {req.model_dir} in {loaded - start:.1f}s; scoring {len(names)} task(s)")
    out = lm_eval.simple_evaluate(
        model=lm, tasks=sorted(names), task_manager=manager, limit=req.limit,
        log_samples=True, random_seed=req.seed, numpy_random_seed=req.seed,
        torch_random_seed=req.seed, fewshot_random_seed=req.seed,
        apply_chat_template=req.apply_chat_template,
    )
    key = f"{METRIC},{FILTER}"
    rows = []
    for name, (task, split) in sorted(names.items()):
        res = out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        correct = [int(s[METRIC]) for s in samples]
        stderr = res.get(f"{METRIC}_stderr,{FILTER}")
        rows.append({
            "task": task, "split": split, "metric": METRIC,
            "value": float(res[key]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None,
            "n": len(correct), "correct": correct,
        })
        log(f"  {task:16s} {split:10s} {METRIC} {res[key]:.3f}  (n={len(correct)})")
    return {
        "model_dir": str(req.model_dir), "backend": req.backend, "scores": rows,
        "lm_eval_version": lm_eval.__version__,
        "seconds": {"load": round(loaded - start, 2), "total": round(time.perf_counter() - start, 2)},
    }


MODEL_CARDS = ("training_card.json", "merge_card.json")


def evaluate_and_save(req: EvalRequest, out: Path, log=print) -> dict:
    """Evaluate and write scores.json, carrying the model's training or merge card along
    (merged checkpoints may be deleted after evaluation; their runtime and memory stay)."""
    import json

    from mergescale.io_utils import atomic_write_json

    result = evaluate(req, log=log)
    for name in MODEL_CARDS:
        card = Path(req.model_dir) / name
        if card.exists():
            result["model_card"] = json.loads(card.read_text())
    atomic_write_json(out, result)
    return result
