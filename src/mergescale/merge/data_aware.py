"""Running data-aware merges: a fit on validation data, then the streaming engine.

Methods registered with `fit` (regmean_plus_plus, adamerging, greedy_soup) first learn
something from each expert's validation data (Gram matrices through the merged model,
merging coefficients, which experts go into the soup). The fit returns values for the
per-tensor function's `params` and, optionally, statistics directories; the merge itself
then streams through `run_merge` like every other method, so outputs, cards and error
handling are shared. Methods with statistics but no fit (fisher, regmean) read the
statistics of the compute_stats rule. Helpers used by several fits live here too.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mergescale.merge.engine import MergeRequest, MergeResult, run_merge
from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import get_method, validate_params


@dataclass
class FitContext:
    """What a fit sees. data[i] is the validation JSONL of expert i's own task."""

    base: Path | None
    experts: list[Path]
    data: list[Path]
    params: dict[str, Any]
    expert_params: list[dict[str, Any]]
    seed: int
    device: torch.device
    scratch: Path  # deleted after the merge
    log: Callable[[str], None] = print

    def rows(self, i: int, examples: int) -> list[dict]:
        """The first `examples` rows of expert i's data (splits are shuffled when made)."""
        from mergescale.tasks import read_jsonl

        rows = read_jsonl(self.data[i])
        if not rows:
            raise MergeInputError(f"{self.data[i]}: no validation examples")
        return rows[:examples]


@dataclass
class Fitted:
    params: dict[str, Any]  # added to the per-tensor function's params
    stats: list[Path] | None = None  # statistics directories the fit wrote (one per expert)
    card: dict[str, Any] = field(default_factory=dict)  # what the fit learned, for the card


def merge_with_data(req: MergeRequest, data: list[Path] | None = None, log=print,
                    fit_device: str | None = None) -> MergeResult:
    """Merge like run_merge; methods with a fit first run it on `data`.

    data: one validation JSONL per expert, in the order of req.experts.
    fit_device: where the fit runs models; default: the GPU if there is one (the
        streaming merge itself stays on req.device).
    """
    method = get_method(req.method)
    if method.fit is None:
        return run_merge(req)
    if not data or len(data) != len(req.experts):
        raise MergeInputError(
            f"{method.name} learns from data: give one validation data file per expert "
            f"(got {len(data or [])} for {len(req.experts)} experts)"
        )
    resolved = validate_params(method, req.params, req.expert_params, n_experts=len(req.experts))
    if method.needs_base and req.base is None:
        raise MergeInputError(f"{method.name} needs a base model (base_model)")
    from mergescale.merge.statistics import default_device

    device = torch.device(fit_device or default_device())
    req.out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix=f".{req.out_dir.name}.fit-", dir=req.out_dir.parent) as scratch:
        torch.manual_seed(req.seed)
        ctx = FitContext(req.base, list(req.experts), [Path(d) for d in data], resolved.params,
                         resolved.expert_params, req.seed, device, Path(scratch), log)
        fitted = method.fit(ctx)
        fit_card = {"seconds": round(time.perf_counter() - start, 3),
                    "data": [str(d) for d in data], **fitted.card}
        if device.type == "cuda":
            fit_card["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        log(f"{method.name}: fitted on validation data in {fit_card['seconds']:.1f}s")
        req = dataclasses.replace(
            req, fitted=fitted.params, stats=fitted.stats if fitted.stats is not None else req.stats,
            card_extra={**(req.card_extra or {}), "fit": fit_card},
        )
        return run_merge(req)


# -- helpers shared by fits -------------------------------------------------------------


def load_models(paths: list[Path], device: torch.device) -> list[torch.nn.Module]:
    """Experts as float32 transformers models in eval mode, gradients off."""
    from mergescale.models.llama import load_model

    models = []
    for p in paths:
        model, _ = load_model(p)
        model.to(device).eval().requires_grad_(False)
        models.append(model)
    return models


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating tensors of the model's state dict (what the engine merges)."""
    return {n: t for n, t in model.state_dict().items() if t.is_floating_point()}


def prompt_batches(tokenizer, prompts: list[str], batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompts; `last` indexes each prompt's final token."""
    from mergescale.training.loop import collate

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batches = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s : s + batch_size]
        b = collate([(x, x) for x in chunk], tokenizer.pad_token_id)
        batches.append({"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
                        "last": torch.tensor([len(x) - 1 for x in chunk], device=device)})
    return batches


def text_batches(tokenizer, rows: list[dict], batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompt + answer, encoded as in fine-tuning."""
    from mergescale.training.loop import collate, encode

    enc = encode(tokenizer, rows, loss_on="answer")
    out = []
    for s in range(0, len(enc), batch_size):
        b = collate(enc[s : s + batch_size], tokenizer.pad_token_id)
        out.append({"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)})
    return out


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], batch_size: int = 64, max_new_tokens: int = 12) -> float:
    """Greedy decoding until a newline, stripped, compared with the answer (as lm-eval scores)."""
    from mergescale.tasks.lmeval_yaml import MAX_ANSWER_CHARS

    max_new_tokens = min(max_new_tokens, MAX_ANSWER_CHARS)
    device = next(model.parameters()).device
    correct = 0
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every prompt from its end
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, t in zip(chunk, texts):
                correct += int(t.split("\n")[0].strip() == str(r["answer"]).strip())
    finally:
        tokenizer.padding_side = old_side
    return correct / max(1, len(rows))
