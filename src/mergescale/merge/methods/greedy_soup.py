"""Greedy soup: average the experts that help on validation data.

Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", https://arxiv.org/abs/2203.05482
(Recipe 1, greedy soup)

Each expert is scored on the validation examples of every merged task (greedy decoding,
exact match, averaged over tasks); in order of decreasing score, an expert joins the
soup if the average of the soup plus it scores at least as well as the soup so far.
The merged model is the uniform average of the chosen experts (streamed like linear).
"""

from __future__ import annotations

import copy

import torch

from mergescale.merge.methods.linear import linear
from mergescale.merge.registry import Hyperparameter, register_method


def greedy_order(scores: list[float], score_soup, ) -> tuple[list[int], list[dict]]:
    """Indices in the soup and the history of tries; score_soup(indices) -> score."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    soup, best = [order[0]], scores[order[0]]
    history = [{"try": soup, "score": best, "kept": True}]
    for i in order[1:]:
        s = score_soup(soup + [i])
        kept = s >= best  # the paper keeps ties
        history.append({"try": soup + [i], "score": s, "kept": kept})
        if kept:
            soup, best = soup + [i], s
    return sorted(soup), history


def _fit(ctx):
    from mergescale.merge.data_aware import Fitted, exact_match, float_state, load_models, load_tokenizer

    p = ctx.params
    experts = load_models(ctx.experts, ctx.device)
    tokenizer = load_tokenizer(ctx.experts[0])
    rows = [ctx.rows(i, p["examples"]) for i in range(len(experts))]

    def score(model) -> float:
        return sum(exact_match(model, tokenizer, r, p["batch_size"]) for r in rows) / len(rows)

    individual = [score(m) for m in experts]
    states = [float_state(m) for m in experts]
    work = copy.deepcopy(experts[0])
    target = work.state_dict()

    def score_soup(indices: list[int]) -> float:
        with torch.no_grad():
            for n, t in target.items():
                if n in states[0]:
                    t.copy_(sum(states[i][n] for i in indices) / len(indices))
        return score(work)

    soup, history = greedy_order(individual, score_soup)
    ctx.log(f"greedy_soup: expert scores {individual}; soup {soup}")
    weights = [1.0 if i in soup else 0.0 for i in range(len(experts))]
    return Fitted(params={"soup_weights": weights},
                  card={"expert_scores": individual, "soup": soup, "history": history})


@register_method(
    name="greedy_soup",
    hyperparameters=[
        Hyperparameter("examples", "int", 32, "Validation examples per merged task for scoring.", low=1),
        Hyperparameter("batch_size", "int", 64, "Generation batch size for scoring.", low=1),
    ],
    needs_base=False,
    paper="Wortsman et al. 2022, Model soups (greedy soup), https://arxiv.org/abs/2203.05482",
    description="Uniform average of the experts added greedily while the validation score does not drop.",
    fit=_fit,
)
def greedy_soup(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    weights = params["soup_weights"]
    chosen = [x for x, w in zip(experts, weights) if w > 0]
    return linear(None, chosen, [{"weight": 1.0}] * len(chosen), {"normalize": True}, generator, name)
