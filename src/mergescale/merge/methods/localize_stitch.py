"""Localize-and-Stitch: each expert keeps a sparse set of its changes, stitched together.

He et al., 2024, "Localize-and-Stitch: Efficient Model Merging via Sparse Task
Arithmetic", https://arxiv.org/abs/2408.13656 (one of MergeBench's eight methods)

Localize: for expert i with task vector tau_i = theta_i - theta_0, a binary mask gamma_i
keeps a `sparsity` fraction of the entries. Dataless: the entries of largest |tau_i|.
With data (the default): real mask logits S_i start at +sigmoid_bias on those entries
and -sigmoid_bias elsewhere; the model theta_0 + sigmoid(S_i) * tau_i is trained on the
expert's validation rows (answer tokens' cross-entropy + l1_strength * mean sigmoid(S_i))
by plain gradient descent on S_i alone (lr 1e8 as in MergeBench: the gradients on S are
tiny), and gamma_i keeps the same count of entries, those of largest S_i.
Stitch: where several masks keep an entry their task vectors are averaged,

    merged = theta_0 + sum_i gamma_i tau_i / max(1, sum_i gamma_i).

Entries are chosen per tensor (the paper ranks the whole model at once; per tensor
keeps the fit's memory to one model's worth of logits and the merge streaming).
"""

from __future__ import annotations

import torch

from mergescale.merge.registry import Hyperparameter, register_method


def top_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The `sparsity` fraction of entries with the largest scores (at least one)."""
    flat = scores.flatten()
    keep = max(1, int(round(sparsity * flat.numel())))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.float(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _fit(ctx):
    from safetensors.torch import save_file
    from torch.func import functional_call

    from mergescale.merge.data_aware import Fitted, float_state, load_models, load_tokenizer
    from mergescale.training.loop import collate, encode

    p = ctx.params
    if p["dataless"]:
        return Fitted(params={"mask_files": []}, card={"dataless": True})
    (base,) = load_models([ctx.base], ctx.device)
    base_state = float_state(base)
    tokenizer = load_tokenizer(ctx.experts[0])
    names = [n for n, _ in base.named_parameters()]
    files, kept_changed = [], []
    for i, expert_dir in enumerate(ctx.experts):
        (expert,) = load_models([expert_dir], ctx.device)
        expert_state = float_state(expert)
        del expert
        tau = {n: expert_state[n] - base_state[n] for n in names}
        del expert_state
        logits = {n: torch.where(top_mask(t.abs(), p["sparsity"]), p["sigmoid_bias"], -p["sigmoid_bias"])
                  .requires_grad_(True) for n, t in tau.items()}
        encoded = encode(tokenizer, ctx.rows(i, p["examples"]), loss_on="answer")  # as in fine-tuning
        batches = [{k: v.to(ctx.device) for k, v in collate(encoded[s:s + p["batch_size"]], tokenizer.pad_token_id).items()}
                   for s in range(0, len(encoded), p["batch_size"])]
        for _ in range(p["epochs"]):
            for batch in batches:
                params = {n: base_state[n] + torch.sigmoid(logits[n]) * tau[n] for n in names}
                out = functional_call(base, params, args=(), kwargs={
                    "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
                logits_lm = out.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits_lm.reshape(-1, logits_lm.shape[-1]), labels.reshape(-1), ignore_index=-100)
                if p["l1_strength"]:
                    total = sum(s.numel() for s in logits.values())
                    loss = loss + p["l1_strength"] * sum(torch.sigmoid(s).sum() for s in logits.values()) / total
                grads = torch.autograd.grad(loss, list(logits.values()))
                with torch.no_grad():
                    for s, g in zip(logits.values(), grads):
                        s.sub_(p["lr"] * g)
        masks = {n: top_mask(s.detach(), p["sparsity"]).to(torch.uint8).cpu() for n, s in logits.items()}
        init = {n: top_mask(t.abs(), p["sparsity"]) for n, t in tau.items()}
        same = sum(int((masks[n].bool() & init[n].cpu()).sum()) for n in names)
        kept_changed.append(round(1 - same / max(1, sum(int(m.sum()) for m in masks.values())), 4))
        path = ctx.scratch / f"mask_{i}.safetensors"
        save_file(masks, str(path))
        files.append(str(path))
        ctx.log(f"localize_stitch: expert {i}: mask trained on {len(batches)} batches; "
                f"{kept_changed[-1]:.1%} of kept entries moved from the magnitude start")
    return Fitted(params={"mask_files": files},
                  card={"dataless": False, "moved_from_magnitude_start": kept_changed})


_OPEN: dict[str, object] = {}


def _mask(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    if path not in _OPEN:
        _OPEN[path] = safe_open(path, framework="pt")
    f = _OPEN[path]
    return f.get_tensor(name).bool() if name in f.keys() else None


@register_method(
    name="localize_stitch",
    hyperparameters=[
        Hyperparameter("sparsity", "float", 0.1, "Fraction of each tensor's entries an expert keeps.",
                       low=0.0, high=1.0, low_inclusive=False),
        Hyperparameter("dataless", "bool", False, "Keep the entries of largest |task vector| (no training)."),
        Hyperparameter("sigmoid_bias", "float", 3.0, "Initial mask logit magnitude.", low=0.0, low_inclusive=False),
        Hyperparameter("lr", "float", 1.0e8, "Step size of gradient descent on the mask logits.",
                       low=0.0, low_inclusive=False),
        Hyperparameter("epochs", "int", 1, "Passes over the validation examples.", low=1),
        Hyperparameter("l1_strength", "float", 0.0, "Weight of the mask's mean sigmoid in the loss.", low=0.0),
        Hyperparameter("examples", "int", 64, "Validation examples per expert for localization.", low=1),
        Hyperparameter("batch_size", "int", 8, "Batch size of the localization pass.", low=1),
    ],
    needs_base=True,
    paper="He et al. 2024, Localize-and-Stitch, https://arxiv.org/abs/2408.13656",
    description="Each expert keeps a sparse mask of its task vector (learned on validation data, "
                "or by magnitude); overlapping entries are averaged.",
    fit=_fit,
)
def localize_stitch(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    base32 = base.to(torch.float32)
    total = torch.zeros_like(base32)
    count = torch.zeros_like(base32)
    files = params["mask_files"]
    for i, x in enumerate(experts):
        tau = x.to(torch.float32) - base32
        mask = _mask(files[i], name) if files else None
        if mask is None:  # dataless, or a tensor the fit did not train (a buffer)
            mask = top_mask(tau.abs(), params["sparsity"])
        total += tau * mask
        count += mask
    return base32 + total / count.clamp(min=1)
