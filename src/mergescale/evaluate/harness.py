"""Score models with lm-eval (the real harness, HF backend by default) on local tasks.

One process scores every requested task for a model, so lm-eval's start-up (imports,
task indexing) is paid once per model rather than once per task. Only our own task
directory is indexed (``include_defaults=False``) unless the config names public lm-eval
tasks (``tasks.lm_eval``): indexing lm-eval's hundreds of built-in tasks would cost more
than scoring a tiny model. The vLLM backend is an optional dependency for GPU clusters.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    import torch

from mergescale.models.remote_code import check_no_remote_code
from mergescale.tasks.lmeval_yaml import lm_eval_task_name

METRIC = "exact_match"
FILTER = "strip"


@dataclass(frozen=True)
class EvalRequest:
    model_dir: Path
    task_dir: Path | None  # directory of rendered task YAMLs (None: no procedural tasks)
    tasks: tuple[tuple[str, str], ...]  # (task, split) pairs of procedural tasks
    backend: str = "hf"  # "hf" or "vllm"
    device: str = "auto"  # "auto": a GPU when there is one
    batch_size: int = 64
    limit: int | None = None  # examples per task; None = the whole split
    seed: int = 0
    # task name -> {"metrics": {lm-eval task: "metric,filter"}, "cluster", "unsafe_code"}
    lm_eval_tasks: dict = field(default_factory=dict)
    # Chat models: prompts go through the tokenizer's chat template (as in training);
    # generation stops at "\n" (the task's `until`) or at the end-of-turn token, which
    # lm-eval's HF backend adds to `until` as the tokenizer's EOS.
    apply_chat_template: bool = False


def request_from_params(model_dir, task_files, params) -> EvalRequest:
    """The EvalRequest of a workflow job: its model, its rendered task YAMLs and the
    evaluate rules' params (tasks, backend, batch_size, limit, seed, lm_eval_tasks,
    chat_template)."""
    return EvalRequest(
        model_dir=Path(model_dir),
        task_dir=Path(task_files[0]).parent if task_files else None,
        tasks=tuple(tuple(t) for t in params.tasks),
        backend=params.backend,
        batch_size=params.batch_size,
        limit=params.limit,
        seed=params.seed,
        lm_eval_tasks=dict(params.lm_eval_tasks),
        apply_chat_template=params.chat_template,
    )


class BackendUnavailable(RuntimeError):
    pass


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lm_model_args(req: EvalRequest) -> tuple[str, dict]:
    """lm-eval's model name and model_args for ``req.backend``."""
    if req.backend == "hf":
        device = _device(req.device)
        # float32 on CPU (tiny models, exact scores); the checkpoint's dtype on a GPU.
        return "hf", {"pretrained": str(req.model_dir), "device": device,
                      "batch_size": req.batch_size,
                      "dtype": "float32" if device == "cpu" else "auto",
                      "trust_remote_code": False}
    if req.backend == "vllm":
        return "vllm", {"pretrained": str(req.model_dir), "dtype": "auto", "batch_size": "auto",
                        "seed": req.seed, "trust_remote_code": False}
    raise ValueError(f"config key evaluate.backend: unknown backend {req.backend!r}; use 'hf' or 'vllm'")


def check_backend(backend: str) -> None:
    """Fail before any task is indexed when the backend's package is not installed."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable(
            "config key evaluate.backend: 'vllm' needs the optional dependency vllm, which is "
            "not installed (pip install 'mergescale[vllm]' on the GPU nodes), or set "
            "evaluate.backend: hf")


def _make_lm(req: EvalRequest):
    if (Path(req.model_dir) / "model_spec.json").exists():  # a model that is not a checkpoint
        from mergescale.evaluate.spec_models import load_spec_model

        return load_spec_model(Path(req.model_dir), device=_device(req.device), batch_size=req.batch_size)
    # Code shipped with a checkpoint is never run (mergescale.models.remote_code).
    check_no_remote_code(req.model_dir)
    name, args = lm_model_args(req)
    check_backend(req.backend)
    if name == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(**args)
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(**args)


def _n_samples(out: dict, name: str) -> int:
    """Examples scored for an lm-eval task, or for every task of a group."""
    if name in out.get("n-samples", {}):
        return int(out["n-samples"][name]["effective"])
    return sum(_n_samples(out, sub) for sub in out.get("group_subtasks", {}).get(name, []))


def lm_eval_score(task: str, spec: dict, out: dict) -> dict:
    """One score row for a task scored by public lm-eval tasks: the mean of their metrics."""
    parts, stderrs = {}, []
    for name, metric in spec["metrics"].items():
        res = out["results"].get(name) or out.get("groups", {}).get(name)
        if res is None or metric not in res:
            have = sorted(k for k in (res or {}) if "," in k and "_stderr" not in k)
            raise KeyError(f"config key tasks.lm_eval.{task}.metrics.{name}: lm-eval reported no "
                           f"{metric!r} for {name} (it reported: {', '.join(have) or 'nothing'})")
        parts[name] = float(res[metric])
        m, f = metric.split(",", 1)
        stderrs.append(res.get(f"{m}_stderr,{f}"))
    stderr = stderrs[0] if len(stderrs) == 1 else None
    metrics = sorted({m.split(",")[0] for m in spec["metrics"].values()})
    return {
        "task": task, "split": "test", "metric": "+".join(metrics),
        "value": sum(parts.values()) / len(parts),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None,
        "n": sum(_n_samples(out, name) for name in parts), "parts": parts,
        "cluster": spec.get("cluster", task),
    }


def _cache_lm_eval_templates() -> None:
    """lm-eval compiles each Jinja prompt template afresh for every document (jinja's
    from_string does not cache): most of the time spent scoring a tiny model. Compiling
    is pure, so compiled templates are cached per process; rendered prompts are unchanged."""
    import functools

    from lm_eval import utils

    if getattr(utils.apply_template, "cached", False):
        return
    compile_template = functools.lru_cache(maxsize=256)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_template(template).render(**doc)

    apply_template.cached = True
    utils.apply_template = apply_template


def _task_manager(task_dir: Path | None, names, public: list[str] = ()):
    """lm-eval's task index: our rendered YAMLs, plus lm-eval's own tasks only when public
    ones are asked for (indexing them takes ~15 s of CPU)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = str(task_dir) if task_dir else None
    manager = TaskManager(include_path=include, include_defaults=False)
    if set(public) - set(manager.all_tasks):
        manager = TaskManager(include_path=include, include_defaults=True)
    missing = sorted(set(names) - set(manager.all_tasks))
    if missing:
        raise FileNotFoundError(f"no lm-eval task YAML in {task_dir} for: {', '.join(missing)}")
    unknown = sorted(set(public) - set(manager.all_tasks))
    if unknown:
        raise KeyError(f"config key tasks.lm_eval: lm-eval {lm_eval.__version__} has no task or "
                       f"group {', '.join(unknown)}")
    return manager


def _score_rows(out: dict, names: dict[str, tuple[str, str]], log) -> list[dict]:
    """Tidy per-task rows (with per-example correctness) from simple_evaluate's output."""
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
    return rows


def evaluate(req: EvalRequest, log=print) -> dict:
    """Run lm-eval on ``req.tasks`` and return tidy scores with per-example correctness."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    _cache_lm_eval_templates()
    check_backend(req.backend)
    start = time.perf_counter()
    names = {lm_eval_task_name(t, s): (t, s) for t, s in req.tasks}
    public = sorted({n for spec in req.lm_eval_tasks.values() for n in spec["metrics"]})
    manager = _task_manager(req.task_dir, names, public)
    lm = _make_lm(req)
    loaded = time.perf_counter()
    log(f"loaded {req.model_dir} in {loaded - start:.1f}s; scoring {len(names) + len(public)} task(s)")
    out = lm_eval.simple_evaluate(
        model=lm, tasks=sorted(names) + public, task_manager=manager, limit=req.limit,
        log_samples=True, random_seed=req.seed, numpy_random_seed=req.seed,
        torch_random_seed=req.seed, fewshot_random_seed=req.seed,
        confirm_run_unsafe_code=any(s.get("unsafe_code") for s in req.lm_eval_tasks.values()),
        apply_chat_template=req.apply_chat_template,
    )
    rows = _score_rows(out, names, log)
    for task, spec in sorted(req.lm_eval_tasks.items()):
        rows.append(lm_eval_score(task, spec, out))
        log(f"  {task:16s} {rows[-1]['metric']} {rows[-1]['value']:.3f}  (n={rows[-1]['n']})")
    return {
        "model_dir": str(req.model_dir), "backend": req.backend, "scores": rows,
        "lm_eval_version": lm_eval.__version__,
        "seconds": {"load": round(loaded - start, 2), "total": round(time.perf_counter() - start, 2)},
    }


MODEL_CARDS = ("training_card.json", "merge_card.json")


def evaluate_and_save(req: EvalRequest, out: Path, log=print) -> dict:
    """Evaluate and write scores.json, carrying the model's training or merge card along
    (merged checkpoints may be deleted after evaluation; their runtime and memory stay)."""
    from mergescale.io_utils import atomic_write_json

    result = _with_model_card(evaluate(req, log=log), Path(req.model_dir))
    atomic_write_json(out, result)
    return result


def _with_model_card(result: dict, model_dir: Path) -> dict:
    """``result`` with the model's training or merge card, if it has one, as model_card."""
    import json

    for name in MODEL_CARDS:
        card = model_dir / name
        if card.exists():
            result["model_card"] = json.loads(card.read_text())
    return result


@dataclass(frozen=True)
class Candidate:
    """One model of a batch: its weights and the (task, split) pairs it is scored on.

    weights: a checkpoint directory, or a state dict (name -> tensor) of the batch's
    architecture, e.g. an intermediate merge that is never written to disk.
    """

    name: str
    weights: Path | Mapping[str, "torch.Tensor"]
    tasks: tuple[tuple[str, str], ...]
    meta: Mapping = field(default_factory=dict)  # caller's labels, carried along


class BatchEvaluator:
    """Scores many models of one architecture in this process: lm-eval, the task index
    and the model are set up once, and each candidate's weights are swapped into the
    model (no lm-eval start-up per candidate).

    ``reference_dir`` gives the architecture and tokenizer (any model of the batch).
    score() consumes candidates lazily (a generator can build each merge just before it
    is scored) and yields them back with a result shaped like evaluate()'s; scores equal
    those of evaluate() on the same weights (same lm-eval call, same seeds). HF backend.
    """

    def __init__(self, reference_dir: Path, task_dir: Path, *, device: str = "cpu", batch_size: int = 64,
                 limit: int | None = None, seed: int = 0, log=print):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        _cache_lm_eval_templates()
        start = time.perf_counter()
        self.task_dir, self.limit, self.seed, self.log = Path(task_dir), limit, seed, log
        self.lm = _make_lm(EvalRequest(model_dir=Path(reference_dir), task_dir=self.task_dir, tasks=(),
                                       device=device, batch_size=batch_size, limit=limit, seed=seed))
        self.reference_dir = reference_dir
        self._manager = None
        self.n_scored = 0
        log(f"loaded {reference_dir} as the batch's model in {time.perf_counter() - start:.1f}s")

    def _tasks(self, names) -> dict:
        """lm-eval's task dict for ``names``; each task is built (its dataset read) once."""
        if self._manager is None:
            self._manager = _task_manager(self.task_dir, names)
            self._built = {}
        missing = sorted(set(names) - set(self._manager.all_tasks))
        if missing:
            raise FileNotFoundError(f"no lm-eval task YAML in {self.task_dir} for: {', '.join(missing)}")
        new = sorted(set(names) - set(self._built))
        if new:
            self._built.update(self._manager.load(new)["tasks"])
        for name in names:  # what simple_evaluate sets before each run
            task = self._built[name]
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.seed)
        return {"tasks": {n: self._built[n] for n in sorted(names)}, "groups": {}, "group_map": {}}

    def score(self, candidates: Iterable[Candidate]) -> Iterator[tuple[Candidate, dict]]:
        import random

        import lm_eval
        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate as lm_evaluate

        from mergescale.merge.in_memory import load_state

        model = self.lm._model
        for cand in candidates:
            t0 = time.perf_counter()
            names = {lm_eval_task_name(t, s): (t, s) for t, s in cand.tasks}
            task_dict = self._tasks(names)
            state = load_state(cand.weights) if isinstance(cand.weights, (str, Path)) else cand.weights
            with torch.no_grad():
                try:
                    model.load_state_dict(dict(state), strict=True)
                except RuntimeError as err:
                    raise ValueError(f"candidate {cand.name}: weights do not fit the model of "
                                     f"{self.reference_dir}: {err}") from None
            del state
            self.log(f"candidate {cand.name}: {len(names)} task(s)")
            # simple_evaluate's seeding, then its evaluation step; skipped: its per-call
            # environment report (git, pip, torch env), which costs more than scoring here
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
            out = lm_evaluate(lm=self.lm, task_dict=task_dict, limit=self.limit, log_samples=True)
            self.n_scored += 1
            yield cand, {
                "model": cand.name, "backend": "hf", "scores": _score_rows(out, names, self.log),
                "lm_eval_version": lm_eval.__version__,
                "seconds": {"total": round(time.perf_counter() - t0, 2)},
            }


def batchable(req: EvalRequest) -> bool:
    """Whether models evaluated with ``req``'s settings can share one BatchEvaluator:
    procedural tasks on the HF backend, prompts without a chat template."""
    return req.backend == "hf" and not req.lm_eval_tasks and not req.apply_chat_template


def evaluate_batch_and_save(template: EvalRequest, model_dirs: list[Path], out: Path,
                            log=print) -> dict:
    """Evaluate several checkpoints of one architecture in one process and write
    {"models": {model dir: result}} to ``out``, each result what evaluate_and_save would
    write for that model (same scores: BatchEvaluator runs the same lm-eval evaluation
    with the same seeds; mergescale.evaluate.batch_member extracts one). ``template`` gives every
    setting but the model. Start-up (imports, lm-eval's task index, the model) is paid
    once instead of once per model, which dominates evaluation of small models."""
    from mergescale.io_utils import atomic_write_json

    if not batchable(template):
        raise ValueError("batched evaluation needs backend hf, procedural tasks and no chat "
                         "template; evaluate these models one by one")
    model_dirs = [Path(d) for d in model_dirs]
    for d in model_dirs:
        if (d / "model_spec.json").exists():
            raise ValueError(f"{d}: a model spec, not a checkpoint; it cannot join a batch")
        check_no_remote_code(d)
    start = time.perf_counter()
    evaluator = BatchEvaluator(model_dirs[0], template.task_dir, device=template.device,
                               batch_size=template.batch_size, limit=template.limit,
                               seed=template.seed, log=log)
    setup = round(time.perf_counter() - start, 2)
    candidates = (Candidate(name=str(d), weights=d, tasks=template.tasks) for d in model_dirs)
    results = {}
    for cand, scored in evaluator.score(candidates):
        results[cand.name] = _with_model_card({
            "model_dir": cand.name, "backend": "hf", "scores": scored["scores"],
            "lm_eval_version": scored["lm_eval_version"],
            # load: the batch's shared start-up; total: this model's scoring
            "seconds": {"load": setup, "total": scored["seconds"]["total"]},
            "batch": len(model_dirs)}, Path(cand.name))
    batch = {"models": results}
    atomic_write_json(Path(out), batch)
    return batch


def evaluate_candidates(reference_dir: Path, candidates: Iterable[Candidate], task_dir: Path,
                        **kwargs) -> Iterator[tuple[Candidate, dict]]:
    """BatchEvaluator(reference_dir, task_dir, **kwargs).score(candidates)."""
    return BatchEvaluator(reference_dir, task_dir, **kwargs).score(candidates)
