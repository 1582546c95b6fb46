"""RegMean and RegMean++: merging linear layers by regression on their inputs.

Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
https://arxiv.org/abs/2212.09849 ; Nguyen et al., 2025, "RegMean++: Enhancing
Effectiveness and Generalization of Regression Mean for Model Merging",
https://arxiv.org/abs/2508.03121

For a linear layer y = x W^T, with X_i the inputs expert i's data gives that layer,
RegMean picks the W that best reproduces every expert's outputs on its own inputs:

    W = argmin sum_i ||X_i W^T - X_i W_i^T||^2  =>  W^T = (sum_i G_i)^-1 sum_i G_i W_i^T,
    G_i = X_i^T X_i (the Gram matrix, [in, in]).

The off-diagonal entries of each G_i are scaled by alpha (0.9 in the paper), which
shrinks towards plain averaging and keeps the sum invertible. Tensors that are not
linear weights (embeddings, norms) are averaged.

regmean takes each G_i from the expert alone (compute_stats rule). regmean_plus_plus
takes X_i of layer l from the *merged* model: expert i's data runs through the already
merged layers 0..l-1, then through expert i's own layer l (whose linears' inputs give
G_i), layer by layer; the final linears (lm_head) see the whole merged model. That
needs the merged layers as it goes, so it runs inside the merge job (a fit), writes its
Gram matrices to a scratch directory, and the engine then streams the same per-tensor
function over them.
"""

from __future__ import annotations

import copy

import torch

from mergescale.merge.registry import Hyperparameter, register_method

ALPHA = Hyperparameter(
    "alpha", "float", 0.9,
    "Scale of the Gram matrices' off-diagonal entries (1: exact regression, 0: diagonal only).",
    low=0.0, high=1.0,
)
EXAMPLES = Hyperparameter("examples", "int", 64, "Validation examples per expert for the Gram matrices.", low=1)
BATCH = Hyperparameter("batch_size", "int", 32, "Examples per forward pass.", low=1)


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G), in float64."""
    g = gram.to(torch.float64)
    return g.mul(alpha).add_(torch.diag_embed(torch.diagonal(g)), alpha=1 - alpha)


def regmean_solve(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """W = ((sum_i G_i)^-1 sum_i G_i W_i^T)^T for [out, in] weights and [in, in] Grams."""
    total = None
    rhs = None
    for w, g in zip(weights, grams):
        gs = scale_off_diagonal(g, alpha)
        term = gs @ w.to(torch.float64).T  # [in, out]
        total = gs if total is None else total.add_(gs)
        rhs = term if rhs is None else rhs.add_(term)
    try:
        solution = torch.linalg.solve(total, rhs)
    except RuntimeError:  # singular (inputs that are always 0): least norm solution
        solution = torch.linalg.lstsq(total.cpu(), rhs.cpu(), driver="gelsd").solution.to(total.device)
    return solution.T.to(torch.float32).contiguous()


def average(experts: list[torch.Tensor]) -> torch.Tensor:
    out = experts[0].to(torch.float32, copy=True)
    for x in experts[1:]:
        out.add_(x.to(torch.float32))
    return out.div_(len(experts))


def _regmean(base, experts, expert_params, params, generator, name, *, stats) -> torch.Tensor:
    grams = [s["gram"] for s in stats]
    if experts[0].dim() == 2 and all(g is not None for g in grams):
        return regmean_solve(experts, grams, params["alpha"])
    return average(experts)


register_method(
    name="regmean",
    hyperparameters=[ALPHA],
    needs_base=False,
    paper="Jin et al. 2023, RegMean, https://arxiv.org/abs/2212.09849",
    description="Linear layers by least squares on each expert's input Gram matrices; the rest averaged.",
    stats=("gram",),
)(_regmean)


# -- RegMean++ ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass after the layer of interest."""


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks: its largest nn.ModuleList."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError("regmean_plus_plus: the model has no list of layers")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _grams_through(model, batches, linears: dict[str, torch.nn.Linear], stop_at=None) -> dict[str, torch.Tensor]:
    """Gram matrices of `linears`' inputs while `model` runs `batches`, stopping after `stop_at`."""
    from mergescale.merge.statistics import GramCollector

    collector = GramCollector(linears)
    stopper = None
    if stop_at is not None:
        def stop(module, args, output):
            raise _Stop
        stopper = stop_at.register_forward_hook(stop)
    try:
        with torch.no_grad():
            for b in batches:
                collector.mask = b["attention_mask"]
                try:
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                except _Stop:
                    pass
    finally:
        collector.remove()
        if stopper is not None:
            stopper.remove()
    return collector.grams


def _set_merged(merged_model, names: list[str], experts_state: list[dict], grams: list[dict], alpha: float) -> None:
    """Merge `names` (RegMean for linear weights with Grams, average otherwise) in place."""
    state = merged_model.state_dict()
    with torch.no_grad():
        for n in names:
            xs = [s[n] for s in experts_state]
            stats = [{"gram": g.get(n)} for g in grams]
            state[n].copy_(_regmean(None, xs, None, {"alpha": alpha}, None, n, stats=stats))


def _fit_regmean_plus_plus(ctx):
    from safetensors.torch import save_file

    from mergescale.merge.data_aware import Fitted, float_state, load_models, load_tokenizer, text_batches
    from mergescale.merge.statistics import GRAM_FILE, TOKENS_KEY, linear_modules

    p = ctx.params
    experts = load_models(ctx.experts, ctx.device)
    tokenizer = load_tokenizer(ctx.experts[0])
    batches = [text_batches(tokenizer, ctx.rows(i, p["examples"]), p["batch_size"], ctx.device)
               for i in range(len(experts))]
    states = [float_state(m) for m in experts]
    merged = copy.deepcopy(experts[0])
    layers_name, layers = _decoder_layers(merged)
    all_names = list(states[0])
    in_layer = [[n for n in all_names if n.startswith(f"{layers_name}.{l}.")] for l in range(len(layers))]
    in_layers = {n for names in in_layer for n in names}
    outside = [n for n in all_names if n not in in_layers]
    merged_linears = linear_modules(merged)
    # Tensors outside the layers that feed them (embeddings) do not depend on any Gram.
    _set_merged(merged, [n for n in outside if n not in merged_linears], states, [{}] * len(states), p["alpha"])
    grams: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    for l, names in enumerate(in_layer):
        own = layers[l]
        for i, expert in enumerate(experts):
            expert_layer = _decoder_layers(expert)[1][l]
            layers[l] = expert_layer  # merged 0..l-1, then expert i's own layer l
            try:
                prefix = f"{layers_name}.{l}."
                linears = {prefix + n: m for n, m in linear_modules(expert_layer).items()}
                grams[i].update(_grams_through(merged, batches[i], linears, stop_at=expert_layer))
            finally:
                layers[l] = own
        _set_merged(merged, names, states, grams, p["alpha"])
        ctx.log(f"regmean_plus_plus: layer {l + 1}/{len(layers)} merged")
    # Linears after the layers (lm_head) see the whole merged model.
    rest = {n: m for n, m in merged_linears.items() if n in outside}
    for i in range(len(experts)):
        grams[i].update(_grams_through(merged, batches[i], rest))
    dirs = []
    for i, g in enumerate(grams):
        d = ctx.scratch / f"expert{i}"
        d.mkdir()
        tokens = int(sum(int(b["attention_mask"].sum()) for b in batches[i]))
        save_file({**{n: t.contiguous().cpu() for n, t in g.items()},
                   TOKENS_KEY: torch.tensor([tokens])}, str(d / GRAM_FILE))
        dirs.append(d)
    return Fitted(params={}, stats=dirs, card={"examples_per_expert": [sum(len(b["input_ids"]) for b in bs)
                                                                        for bs in batches]})


register_method(
    name="regmean_plus_plus",
    hyperparameters=[ALPHA, EXAMPLES, BATCH],
    needs_base=False,
    paper="Nguyen et al. 2025, RegMean++, https://arxiv.org/abs/2508.03121",
    description="RegMean with each layer's inputs taken from the merged model, layer by layer.",
    stats=("gram",),
    fit=_fit_regmean_plus_plus,
)(_regmean)
