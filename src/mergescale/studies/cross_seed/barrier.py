"""Loss barriers along the straight line between two models, before and after matching.

theta(alpha) = (1 - alpha) theta_A + alpha theta_B. The barrier of a pair is
max_alpha [ L(theta(alpha)) - ((1 - alpha) L(theta_A) + alpha L(theta_B)) ]: how far the
loss on the line rises above the line between the end points' losses (Frankle et al.
2020; Ainsworth et al. 2023). "Matched" curves replace theta_B by B permuted onto A
(weight matching), which computes the same function as B, so only the path changes.
Scores are lm-eval exact match on validation splits, from the same runner the workflow
evaluates every model with.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from mergescale.studies.cross_seed.merge import align
from mergescale.evaluate.harness import EvalRequest, evaluate
from mergescale.models.llama import load_model, save_model
from mergescale.training.loop import IGNORE_INDEX, collate, encode


def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    return {n: torch.lerp(a[n].to(torch.float32), b[n].to(torch.float32), alpha) for n in a}


def mean_loss(model, tokenizer, rows: list[dict], loss_on: str, batch_size: int = 64,
              chat_template: bool = False) -> float:
    """Token-averaged cross entropy (on answers, or whole texts for loss_on='all')."""
    encoded = encode(tokenizer, rows, loss_on, chat_template)
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate(encoded[i : i + batch_size], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += losses.item()
            tokens += int((labels != IGNORE_INDEX).sum())
    return total / max(tokens, 1)


def lm_eval_scorer(task_dir: Path, tasks: list[str], limit: int | None, batch_size: int = 64,
                   seed: int = 0, log=print) -> Callable:
    """score(model, tokenizer) -> mean exact match over `tasks` (validation split)."""
    def score(model, tokenizer) -> float:
        with tempfile.TemporaryDirectory(prefix="barrier-") as tmp:
            save_model(model, tokenizer, Path(tmp))
            req = EvalRequest(model_dir=Path(tmp), task_dir=task_dir,
                              tasks=tuple((t, "validation") for t in tasks),
                              batch_size=batch_size, limit=limit, seed=seed)
            result = evaluate(req, log=lambda msg: None)
        return sum(s["value"] for s in result["scores"]) / len(result["scores"])
    return score


@dataclass(frozen=True)
class BarrierPair:
    name: str  # e.g. "bases" or "expert:first_letter"
    model_a: Path
    model_b: Path
    rows: list[dict]  # validation examples the loss is measured on
    loss_on: str  # "all" (bases: pretraining loss) or "answer" (experts)


def barrier_curves(pair: BarrierPair, alphas: list[float], score: Callable | None,
                   max_iter: int = 100, seed: int = 0, log=print) -> pd.DataFrame:
    """Loss (and score) at each alpha, naive and after weight matching B onto A."""
    model, tokenizer = load_model(pair.model_a)
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    model_b, _ = load_model(pair.model_b)
    state_b = model_b.state_dict()
    (matched_b,), _ = align(model.config, state_a, [state_b], max_iter=max_iter, seed=seed)
    rows = []
    for matched, end in ((False, state_b), (True, matched_b)):
        for alpha in alphas:
            model.load_state_dict(interpolate(state_a, end, alpha))
            loss = mean_loss(model, tokenizer, pair.rows, pair.loss_on)
            value = score(model, tokenizer) if score is not None else float("nan")
            rows.append({"pair": pair.name, "model_a": str(pair.model_a), "model_b": str(pair.model_b),
                         "matched": matched, "alpha": alpha, "loss": loss, "score": value})
            log(f"{pair.name} matched={matched} alpha={alpha:.2f}: loss {loss:.4f}, score {value:.3f}")
    return pd.DataFrame(rows)


def barrier_heights(curves: pd.DataFrame) -> pd.DataFrame:
    """Per pair and matched flag: max rise of the loss over the end points' chord (and the
    max drop of the score below it)."""
    out = []
    for (pair, matched), g in curves.groupby(["pair", "matched"], sort=True):
        g = g.sort_values("alpha")
        ends = g.iloc[[0, -1]]
        a0, a1 = ends.alpha.to_numpy()
        if not (math.isclose(a0, 0.0) and math.isclose(a1, 1.0)):
            raise ValueError(f"pair {pair!r}: alphas must run from 0 to 1, got {a0}..{a1}")
        chord = lambda col: (1 - g.alpha) * ends[col].iloc[0] + g.alpha * ends[col].iloc[1]  # noqa: E731
        out.append({"pair": pair, "matched": matched,
                    "loss_barrier": float((g.loss - chord("loss")).max()),
                    "score_barrier": float((chord("score") - g.score).max()),
                    "loss_mid": float(g.loss[g.alpha.sub(0.5).abs().idxmin()])})
    return pd.DataFrame(out)
