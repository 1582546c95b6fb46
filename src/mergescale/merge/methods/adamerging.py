"""AdaMerging: task arithmetic with coefficients learned by entropy minimisation.

Yang et al., 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
https://arxiv.org/abs/2310.02575

    merged = theta_base + sum_k lambda_k * tau_k         (adamerging: one lambda per expert)
    merged[t] = theta_base[t] + sum_k lambda_k,t * tau_k[t]   (adamerging_layerwise: one per
                                                           expert and parameter tensor)

The lambdas start at `init` and are learned with Adam, on unlabeled validation prompts of
the merged experts' tasks, to minimise the entropy of the next-token distribution at the
end of each prompt (where the answer starts): the unsupervised surrogate the paper uses
for test-time adaptation. The model is evaluated with torch.func.functional_call on
base + sum lambda tau, so gradients reach the lambdas only. Learned values go into the
merge card; the merge itself then streams like task arithmetic.
"""

from __future__ import annotations

from functools import partial

import torch

from mergescale.merge import ops
from mergescale.merge.registry import Hyperparameter, register_method

HYPERPARAMETERS = [
    Hyperparameter("init", "float", 0.3, "Initial lambda of every expert (the paper's prior).", low=0.0, high=2.0),
    Hyperparameter("steps", "int", 30, "Adam steps on the entropy.", low=1),
    Hyperparameter("lr", "float", 0.05, "Adam learning rate of the lambdas.", low=0.0, high=1.0, low_inclusive=False),
    Hyperparameter("examples", "int", 32, "Unlabeled validation prompts per expert's task.", low=1),
    Hyperparameter("batch_size", "int", 64, "Prompts per step (batches cycle through the prompts).", low=1),
]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def learn_coefficients(logits_fn, base: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]],
                       batches: list, *, init: float, steps: int, lr: float, layerwise: bool,
                       ) -> tuple[torch.Tensor, list[float]]:
    """Lambdas ([K] or [K, n_tensors] over base's keys) minimising the prediction entropy.

    logits_fn(params, batch) -> [batch, vocab] logits of the merged model `params`.
    Returns the lambdas and the entropy before each step (and after the last).
    """
    names = list(base)
    shape = (len(task_vectors), len(names)) if layerwise else (len(task_vectors),)
    device = next(iter(base.values())).device
    lam = torch.full(shape, float(init), device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)

    def merged(lam):
        out = {}
        for j, n in enumerate(names):
            t = base[n]
            for k, tv in enumerate(task_vectors):
                t = t + (lam[k, j] if layerwise else lam[k]) * tv[n]
            out[n] = t
        return out

    history = []
    for step in range(steps):
        loss = mean_entropy(logits_fn(merged(lam), batches[step % len(batches)]))
        history.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        history.append(float(mean_entropy(logits_fn(merged(lam), batches[steps % len(batches)]))))
    return lam.detach(), history


def _fit(ctx, layerwise: bool):
    from torch.func import functional_call

    from mergescale.merge.data_aware import Fitted, float_state, load_models, load_tokenizer, prompt_batches

    p = ctx.params
    model, *experts = load_models([ctx.base, *ctx.experts], ctx.device)
    base = float_state(model)
    taus = []
    for e in experts:
        state = float_state(e)
        taus.append({n: state[n] - base[n] for n in base})
    del experts
    tokenizer = load_tokenizer(ctx.base)
    prompts = [r["prompt"] for i in range(len(ctx.experts)) for r in ctx.rows(i, p["examples"])]
    generator = torch.Generator().manual_seed(ctx.seed)  # mix the tasks within each batch
    prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=generator).tolist()]
    batches = prompt_batches(tokenizer, prompts, p["batch_size"], ctx.device)

    def logits_fn(params, batch):
        out = functional_call(model, params, args=(),
                              kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                      "use_cache": False})
        return out.logits[torch.arange(len(batch["last"]), device=batch["last"].device), batch["last"]]

    lam, history = learn_coefficients(logits_fn, base, taus, batches, init=p["init"], steps=p["steps"],
                                      lr=p["lr"], layerwise=layerwise)
    ctx.log(f"adamerging: entropy {history[0]:.4f} -> {history[-1]:.4f} in {p['steps']} steps")
    if layerwise:
        coefficients = {n: lam[:, j].tolist() for j, n in enumerate(base)}
    else:
        coefficients = lam.tolist()
    return Fitted(params={"coefficients": coefficients},
                  card={"coefficients": coefficients, "entropy": history, "prompts": len(prompts)})


def adamerging(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    c = params["coefficients"]
    lambdas = c[name] if isinstance(c, dict) else c
    out = ops.f32(base)
    for x, lam in zip(experts, lambdas):
        out.add_(ops.task_vector(x, base), alpha=lam)
    return out


for _name, _layerwise, _what in (("adamerging", False, "one coefficient per expert"),
                                 ("adamerging_layerwise", True, "one coefficient per expert and tensor")):
    register_method(
        name=_name,
        hyperparameters=HYPERPARAMETERS,
        needs_base=True,
        paper="Yang et al. 2024, AdaMerging, https://arxiv.org/abs/2310.02575",
        description=f"Task arithmetic with {_what}, learned by entropy minimisation on validation prompts.",
        fit=partial(_fit, layerwise=_layerwise),
    )(adamerging)
