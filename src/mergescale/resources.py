"""What each workflow job asks a scheduler for, as a function of the work it does.

A job's memory follows the checkpoints it holds at once: a data-free streaming merge
holds a few tensors per expert, an evaluation one model, a fit or a rule-method the base
and its k experts, a training run the weights with their gradients and optimiser states.
Whether it asks for a GPU follows from whether it runs a forward or backward pass, and
whether the run declares GPUs (``--resources gpu=N``, set by the cluster profile): a
CPU machine without that declaration never asks for one. Wall time grows with the
parameter count. The rule files call `rule_resources`; site-specific settings
(partitions, account, GPU model) stay in the profile.

Sizes come, in this order, from a pretrained base's `shape`, from `bases.<name>.parameters`,
from the config.json of a local or already downloaded checkpoint, or from the size in the
repository or file name ("Llama-3.1-8B", "SmolLM2-135M"), raised by NAME_MARGIN because
names round down (gemma-2-2b has 2.6 B parameters).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mergescale.sources.grid import llama_parameter_count, root_base
from mergescale.tasks import ALPHABET
from mergescale.models.tokenizer import char_vocab_size

MB = 2**20
OVERHEAD_MB = 2000  # Python with torch, transformers and lm-eval imported: the tiny tier's footprint
# vLLM's host side: its CPU swap space (4 GiB by default) and CUDA context
VLLM_HOST_MB = 6000
NAME_MARGIN = 1.3  # a size read from a name, raised: names round down
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# SLURM CPUs per job (cpus_per_task); the cluster profile's set-threads gives the same numbers.
CPUS = {"train": 8, "stats": 4, "stream": 8, "fit": 8, "evaluate": 4, "convert": 4}


class ResourceError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    largest_tensor: int  # elements of the largest tensor (the embedding, in practice)
    source: str  # where the numbers come from: shape, config key, config.json or name


@dataclass(frozen=True)
class Work:
    """What a rule's job does, as far as its resources go.

    kind: train (weights, gradients, optimiser states), stats (a backward pass per
    batch), stream (a data-free streaming merge), fit (a data-aware merge or a
    rule-method: forward passes through merged models), evaluate, convert (whole
    checkpoints in float32, no forward pass).
    models: as a function of k, whole checkpoints held at once (in the checkpoint dtype;
    float32 for fit and convert), or for stream the tensors in flight per tensor name.
    """

    kind: str
    models: Callable[[int], int] = lambda k: 1
    forward: bool = True  # runs a forward (or backward) pass: a GPU is worth asking for


def _k_plus_2(k: int) -> int:  # the base, k experts (or task vectors), the merged model
    return k + 2


WORK = {
    "pretrain_base": Work("train"),
    "instruct_base": Work("train"),
    "finetune_expert": Work("train"),
    "finetune_multitask": Work("train"),
    "run_sparse_soup_cycle": Work("train", models=lambda k: 3),  # the copy in training, the soup, the best copy
    "compute_stats": Work("stats"),
    "evaluate": Work("evaluate"),
    "evaluate_batch": Work("evaluate", models=lambda k: 2),  # one model loaded, the next swapped in
    "tune": Work("fit", models=lambda k: 2),  # each candidate is merged to disk, then evaluated
    # data-free: a tensor of the base and of each expert, the float32 result and its copy
    "merge": Work("stream", models=lambda k: k + 3, forward=False),  # data-aware: merge_work()
    # a rule-method: the base, its k experts, the merged model (rule_method_work: per method)
    "merge_rule_method": Work("fit", models=_k_plus_2),
    "merge_opcm": Work("fit", models=_k_plus_2),
    "merge_map": Work("fit", models=_k_plus_2),
    "merge_cross_seed": Work("fit", models=lambda k: 2 * k + 2),  # experts of both seeds
    "measure_barrier": Work("fit", models=lambda k: 4),
    "import_base": Work("convert", models=lambda k: 2, forward=False),
    # one tensor of the base and of every expert, their task vectors stacked, and a float64
    # copy of the stack; its rule passes the number of experts (it has no subset)
    "compute_task_vector_stats": Work("stream", models=lambda k: 3 * k + 2, forward=False),
}


# Rule-methods whose job differs from merge_rule_method's default, by registered name.
RULE_METHOD_WORK = {
    "atlas": Work("fit", models=lambda k: k + 3),  # + gradients of the coefficients' model
    "task_arithmetic_tuned": Work("fit", models=lambda k: k + 3),
    "lora_lego": Work("convert", models=lambda k: 2, forward=False),
}


def rule_method_work(name: str) -> Work:
    """What a merge_rule_method job of the rule-method registered as `name` does."""
    return RULE_METHOD_WORK.get(name, WORK["merge_rule_method"])


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ResourceError(f"config key merge.dtype: unknown dtype {dtype!r}") from None


def size_from_hf_config(cfg: dict) -> tuple[int, int]:
    """(parameters, largest tensor) of a decoder-only transformer's config.json."""
    cfg = cfg.get("text_config", cfg)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    inter, vocab = cfg.get("intermediate_size", 4 * h), cfg["vocab_size"]
    heads = cfg.get("num_attention_heads", 1)
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    per_layer = attention + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings + h, max(vocab * h, h * inter)


_SIZE_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z])")


def size_from_name(name: str) -> int | None:
    """Parameters named in a repository or file name ("Qwen2.5-0.5B" -> 5e8), or None."""
    last = name.rsplit("/", 1)[-1]
    found = [m for m in _SIZE_IN_NAME.finditer(last.replace("_", "-"))]
    if not found:
        return None
    number, unit = found[-1].groups()
    return int(float(number) * (1e9 if unit in "Bb" else 1e6))


def model_size(config: dict, base: str, results: Path = Path("results")) -> ModelSize:
    bases = config["bases"]
    root = root_base(bases, base)
    spec = bases[root]
    key = f"bases.{root}"
    if "shape" in spec:
        shape = spec["shape"]
        vocab = char_vocab_size(ALPHABET)
        params = llama_parameter_count(shape, vocab)
        return ModelSize(params, max(vocab * shape["hidden_size"],
                                     shape["hidden_size"] * shape["intermediate_size"]), f"{key}.shape")
    if "parameters" in spec:
        params = int(spec["parameters"])
        return ModelSize(params, _largest_estimate(params), f"{key}.parameters")
    for cfg_path in ([Path(spec["path"]) / "config.json"] if "path" in spec else []) + [
            results / "bases" / root / "config.json"]:
        if cfg_path.is_file():
            params, largest = size_from_hf_config(json.loads(cfg_path.read_text()))
            return ModelSize(params, largest, str(cfg_path))
    name = spec.get("repo") or (spec.get("gguf") or {}).get("file") or spec.get("path") or ""
    named = size_from_name(name)
    if named:
        params = int(named * NAME_MARGIN)
        return ModelSize(params, _largest_estimate(params), f"{key} name {name!r}")
    raise ResourceError(
        f"config key {key}.parameters: give the parameter count of {name or root!r} "
        "(its name does not say it), so that its jobs ask for enough memory")


def _largest_estimate(params: int) -> int:
    # The embedding, when only the total is known: 5-28% of the parameters in the
    # Llama, Gemma-2 and Qwen2.5 families (Qwen2.5-0.5B the most); this covers them.
    return int(0.12 * params + 1e8)


def memory_mb(rule: str, size: ModelSize, k: int, dtype: str, gpu: bool, work: Work | None = None,
              backend: str = "hf") -> int:
    """Host memory of one job of `rule` merging or holding k experts of this size
    (backend: evaluate.backend, for evaluation jobs)."""
    work = work or WORK[rule]
    extra = VLLM_HOST_MB if work.kind == "evaluate" and backend == "vllm" else 0
    weights = size.parameters * dtype_bytes(dtype)
    if work.kind == "train":
        # weights, gradients and two Adam moments in float32 on a CPU; on a GPU the host
        # holds the loaded checkpoint and the float32 copy sent to the device
        held = size.parameters * (8 if gpu else 16) + (work.models(k) - 1) * size.parameters * 4
    elif work.kind == "stats":
        held = size.parameters * 12  # float32 weights, gradients, the running statistic
    elif work.kind == "stream":
        held = work.models(k) * size.largest_tensor * 4
    elif work.kind in ("convert", "fit"):  # fits load models in float32 (data_aware.load_models)
        held = work.models(k) * size.parameters * 4
    else:
        held = work.models(k) * weights
    return math.ceil(OVERHEAD_MB + extra + 1.2 * held / MB)  # 20% for activations and allocator slack


def runtime_min(rule: str, size: ModelSize, k: int, steps: int = 0, batch: int = 0,
                work: Work | None = None) -> int:
    """Wall-time limit in minutes: planning figures that grow with the parameter count
    (billions, at least 0.1), not measurements; see docs/slurm.md."""
    work = work or WORK[rule]
    b = max(size.parameters / 1e9, 0.1)
    if work.kind == "train":
        # ~55k tokens/s per billion parameters on one H100 (DESIGN.md), 512 tokens a row, x2 margin
        tokens = max(steps, 1) * max(batch, 1) * 512
        minutes = 30 + 2 * tokens * b / 55_000 / 60
    elif work.kind == "stats":
        minutes = 30 + 5 * b
    elif work.kind == "evaluate":
        minutes = 30 + 12 * b * work.models(k)
    elif work.kind == "fit":
        minutes = 60 + 6 * b * (k + 1)
    else:  # streaming merges and conversions: reading and writing the checkpoints
        minutes = 15 + 2 * b * (k + 1)
    return math.ceil(minutes)


def merge_work(method) -> Work:
    """The generic merge rule's work for a registered method: a fit on validation data
    runs forward passes through merged models (base, k experts, the merge); statistics
    from compute_stats (Fisher, RegMean) stream beside the experts' tensors."""
    if method.needs_data:
        # Localize-and-Stitch holds at least the base, an expert, its task vector, the
        # mask logits and their gradient
        return Work("fit", models=lambda k: max(k + 2, 5))
    if method.needs_stats_rule:
        return Work("stream", models=lambda k: 2 * k + 3, forward=False)
    return WORK["merge"]


def gpus_for(rule: str, declared_gpus: int | None, work: Work | None = None) -> int:
    """One GPU for a forward or backward pass when the run declares GPUs, else none."""
    work = work or WORK[rule]
    return int(bool(work.forward and declared_gpus))


def cpus_for(work: Work, max_threads: int | None = None) -> int:
    """SLURM CPUs of a job, at most the profile's max-threads (a small test cluster)."""
    return min(CPUS[work.kind], max_threads or CPUS[work.kind])


def check_gpu_placement(forward_rules: list[str], declared_gpus: int | None,
                        overrides: dict[str, dict], cluster: bool) -> None:
    """A cluster run that cannot give its forward passes a GPU fails before any job.

    cluster: jobs are submitted to a scheduler (not a local or dry run). GPUs are
    declared with the profile key `resources: [gpu=N]` (N = 0: a cluster without GPUs,
    every job on CPUs). A set-resources entry `gpu: 0` for a forward-pass rule, while
    GPUs are declared, is a mistake too.
    """
    if cluster and declared_gpus is None:
        raise ResourceError(
            "profile key resources: declare the GPUs this run may hold at once (gpu=N; "
            "gpu=0 on a cluster without GPUs), so that forward-pass jobs ask for one")
    if declared_gpus:
        for rule in forward_rules:
            value = (overrides.get(rule) or {}).get("gpu")
            value = getattr(value, "value", value)  # a snakemake Resource, or a plain number
            if value is not None and not isinstance(value, str) and not value:
                raise ResourceError(
                    f"profile key set-resources.{rule}.gpu: 0, but {rule} runs forward passes "
                    f"and the run declares {declared_gpus} GPUs; remove the entry")
