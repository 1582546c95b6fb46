"""Output ensemble of experts: the reference every merge is trying to approximate
without paying k forward passes.

The ensemble's next-token distribution is the mean of its members' distributions; it
decodes greedily from that mean. Members must share a tokenizer (experts of one base).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergescale.io_utils import atomic_directory, atomic_write_json


class OutputEnsemble(torch.nn.Module):
    """k causal LMs whose next-token probabilities are averaged."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """log of the mean of the members' softmax, [batch, seq, vocab]."""
        kwargs = {}
        if attention_mask is not None:
            # left padding: positions count real tokens only, as generate() does
            kwargs = {"attention_mask": attention_mask,
                      "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}
        stacked = torch.stack([
            torch.log_softmax(m(input_ids=input_ids, **kwargs).logits.float(), dim=-1)
            for m in self.members])
        return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(self.members))))

    @torch.no_grad()
    def greedy_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        max_new_tokens: int, stop_ids: set[int], pad_id: int) -> torch.Tensor:
        """Greedy decoding from the averaged distribution; rows that produced a stop token
        are padded from then on. Returns context + generated tokens."""
        ids, mask = input_ids, attention_mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = self.log_probs(ids, mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None].to(mask.dtype)], dim=1)
            done |= torch.isin(nxt, torch.tensor(sorted(stop_ids), device=ids.device))
            if done.all():
                break
        return ids


def write_ensemble_spec(out_dir: Path, members: list[Path]) -> None:
    """A model-spec directory (see mergescale.evaluate.spec_models) naming the ensemble's members."""
    with atomic_directory(Path(out_dir)) as tmp:
        atomic_write_json(tmp / "model_spec.json", {
            "model": "mergescale-ensemble", "module": "mergescale.evaluate.ensemble_lm",
            "model_args": {"members": [str(m) for m in members]}})
