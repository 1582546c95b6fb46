"""aTLAS: learned anisotropic scaling of task vectors, and its line-search baseline.

Zhang et al. 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic
Scaling", https://arxiv.org/abs/2407.02880

    theta = theta_base + sum_i sum_b lambda[i, b] * tau_i restricted to block b

with one coefficient per expert i and parameter block b (a block is a parameter tensor
by default, as in the paper; or a decoder layer; or the whole model), trained by gradient
descent (Adam) on the cross entropy of the answers of a few labelled validation examples.
`line_search_coefficient` is validation-tuned task arithmetic on the same examples: one
coefficient shared by every expert and tensor, the best on a grid, refined by a bounded
scalar minimisation.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Callable

import torch
from scipy.optimize import minimize_scalar
from torch.func import functional_call

from mergescale.merge.in_memory import write_merged_checkpoint
from mergescale.merge.registry import Hyperparameter
from mergescale.rule_methods.registry import RuleJob, register_rule_method
from mergescale.models.llama import load_model
from mergescale.training.loop import collate, encode

BLOCKINGS = ("tensor", "layer", "model")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def parameter_blocks(names: list[str], blocking: str) -> tuple[dict[str, int], list[str]]:
    """{tensor name: block index} and the blocks' names."""
    if blocking == "tensor":
        return {n: i for i, n in enumerate(names)}, list(names)
    if blocking == "model":
        return {n: 0 for n in names}, ["model"]
    if blocking == "layer":  # decoder layer i; everything outside the layers is one block
        labels = [f"layer.{m.group(1)}" if (m := _LAYER.search(n)) else "other" for n in names]
        order = list(dict.fromkeys(labels))
        return {n: order.index(lab) for n, lab in zip(names, labels)}, order
    raise ValueError(f"aTLAS blocks {blocking!r}: expected one of {BLOCKINGS}")


def answer_batch(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """All labelled examples as one batch, loss on the answers only."""
    return collate(encode(tokenizer, rows, loss_on="answer"), tokenizer.pad_token_id)


class TaskVectorModel:
    """The model at theta_base + sum_i,b lambda[i, b] tau_i[b], as a function of lambda."""

    def __init__(self, model, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                 blocking: str):
        self.model = model.eval()
        self.names = [n for n, p in model.named_parameters()]
        for i, e in enumerate(experts):
            missing = [n for n in self.names if n not in e or e[n].shape != base[n].shape]
            if missing:
                raise ValueError(f"expert {i}: tensor {missing[0]!r} missing or of another shape than the base's")
        self.base = {n: base[n].detach().float() for n in self.names}
        self.taus = [{n: e[n].detach().float() - self.base[n] for n in self.names} for e in experts]
        self.block_of, self.blocks = parameter_blocks(self.names, blocking)

    def params(self, coef: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self.base[n] + sum(coef[i, self.block_of[n]] * tau[n] for i, tau in enumerate(self.taus))
                for n in self.names}

    def loss(self, coef: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(self.model, self.params(coef), args=(), kwargs=batch).loss


def learn_coefficients(tvm: TaskVectorModel, batch: dict[str, torch.Tensor], steps: int = 200,
                       lr: float = 0.05, init: float = 0.3, log: Callable[[str], None] | None = None) -> torch.Tensor:
    """Adam on the coefficients (full batch), learning rate cosine-decayed to 1% so the
    last steps settle in the minimum rather than oscillate around it."""
    coef = torch.full((len(tvm.taus), len(tvm.blocks)), float(init), requires_grad=True)
    opt = torch.optim.Adam([coef], lr=lr)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = tvm.loss(coef, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"aTLAS: loss is {loss.item()} at step {step + 1}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            log(f"aTLAS step {step + 1}/{steps}: loss {loss.item():.4f}")
    return coef.detach()


def line_search_coefficient(tvm: TaskVectorModel, batch: dict[str, torch.Tensor],
                            grid: list[float] | None = None) -> tuple[float, float]:
    """One coefficient for every expert and block: the best of a grid, then refined by a
    bounded scalar minimisation between the grid point's neighbours. Returns (lambda, loss)."""
    grid = grid or [round(-0.5 + 0.05 * i, 10) for i in range(61)]  # -0.5 .. 2.5

    def loss_at(lam: float) -> float:
        coef = torch.full((len(tvm.taus), len(tvm.blocks)), float(lam))
        with torch.no_grad():
            return tvm.loss(coef, batch).item()

    losses = [loss_at(x) for x in grid]
    best = min(range(len(grid)), key=losses.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    res = minimize_scalar(loss_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    if res.fun <= losses[best]:
        return float(res.x), float(res.fun)
    return grid[best], losses[best]


HYPERPARAMETERS = (
    Hyperparameter("examples", "int", 16, "Labelled validation examples per task of the subset.", low=1),
    Hyperparameter("blocks", "str", "tensor",
                   "One coefficient per parameter tensor (the paper's), decoder layer (embeddings, final "
                   "norm and head share one) or expert.", choices=BLOCKINGS),
    Hyperparameter("steps", "int", 100, "Full-batch Adam steps.", low=1),
    Hyperparameter("lr", "float", 0.05, "Peak learning rate (cosine-decayed to 1%).", low=0.0, low_inclusive=False),
    Hyperparameter("init", "float", 0.3, "Initial coefficient."),
)
LINE_SEARCH_HYPERPARAMETERS = HYPERPARAMETERS[:1]  # the same labelled examples
ATLAS_PAPER = ("Zhang et al. 2024, Knowledge Composition using Task Vectors with Learned Anisotropic "
               "Scaling, https://arxiv.org/abs/2407.02880")
ATLAS_DESCRIPTION = ("Task arithmetic with one coefficient per expert and parameter block, learned by "
                     "gradient descent on labelled validation examples (aTLAS).")
LINE_SEARCH_PAPER = "Ilharco et al. 2023, Editing models with task arithmetic, https://arxiv.org/abs/2212.04089"
LINE_SEARCH_DESCRIPTION = ("Task arithmetic with one coefficient for all experts, chosen by line "
                           "search on the same labelled validation examples as aTLAS.")


def merge_atlas(method: str, base_dir: Path, expert_dirs: list[Path], rows: list[dict], out_dir: Path, *,
                blocks: str | None = None, steps: int | None = None, lr: float | None = None,
                init: float | None = None, seed: int = 0, dtype: str = "float32", log=print) -> dict:
    """`atlas` (learned coefficients; blocks, steps, lr and init: HYPERPARAMETERS) or
    `task_arithmetic_tuned` (one line-searched coefficient) of `expert_dirs` over
    `base_dir`, from labelled `rows`; saved with a card."""
    if method not in ("atlas", "task_arithmetic_tuned"):
        raise ValueError(f"method {method!r}: expected atlas or task_arithmetic_tuned")
    if not rows:
        raise ValueError(f"{method} needs labelled validation examples")
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer = load_model(base_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    experts = [{n: p.detach() for n, p in load_model(d)[0].named_parameters()} for d in expert_dirs]
    tvm = TaskVectorModel(model, base, experts, blocks if method == "atlas" else "model")
    batch = answer_batch(tokenizer, rows)
    if method == "atlas":
        coef = learn_coefficients(tvm, batch, steps=steps, lr=lr, init=init, log=log)
        params = {"blocks": blocks, "steps": steps, "lr": lr, "init": init}
        description, paper = ATLAS_DESCRIPTION, ATLAS_PAPER
    else:
        lam, _ = line_search_coefficient(tvm, batch)
        coef = torch.full((len(experts), 1), lam)
        params = {"lambda": lam}
        description, paper = LINE_SEARCH_DESCRIPTION, LINE_SEARCH_PAPER
    with torch.no_grad():
        loss = tvm.loss(coef, batch).item()
        model.load_state_dict(tvm.params(coef), strict=False)
    log(f"{method}: validation answer loss {loss:.4f} on {len(rows)} examples")
    return write_merged_checkpoint(model.state_dict(), Path(base_dir), Path(out_dir), {
        "method": method, "description": description, "paper": paper,
        "params": {**params, "examples": len(rows), "validation_loss": loss},
        "base": {"path": str(Path(base_dir).resolve())},
        "experts": [{"path": str(Path(d).resolve()),
                     "params": {"coefficients": [round(x, 5) for x in coef[i].tolist()]}}
                    for i, d in enumerate(expert_dirs)],
        "seed": seed, "blocks": tvm.blocks if method == "atlas" else ["model"],
    }, dtype=dtype, started=start)


def labelled_rows(job: RuleJob) -> list[dict]:
    """The first `examples` validation examples of each task of the subset."""
    from mergescale.tasks import read_jsonl

    n = job.params["examples"]
    return [row for path in job.data["validation_data"] for row in read_jsonl(Path(path))[:n]]


@register_rule_method(name="atlas", hyperparameters=HYPERPARAMETERS, paper=ATLAS_PAPER,
                      description=ATLAS_DESCRIPTION, needs=("validation_data",), batch_eval=True)
def run_atlas(job: RuleJob) -> dict:
    settings = {k: v for k, v in job.params.items() if k != "examples"}
    return merge_atlas("atlas", job.base, job.experts, labelled_rows(job), job.out_dir,
                       seed=job.seed, dtype=job.dtype, log=job.log, **settings)


@register_rule_method(name="task_arithmetic_tuned", hyperparameters=LINE_SEARCH_HYPERPARAMETERS,
                      paper=LINE_SEARCH_PAPER, description=LINE_SEARCH_DESCRIPTION,
                      needs=("validation_data",), batch_eval=True)
def run_line_search(job: RuleJob) -> dict:
    return merge_atlas("task_arithmetic_tuned", job.base, job.experts, labelled_rows(job), job.out_dir,
                       seed=job.seed, dtype=job.dtype, log=job.log)
