"""Training loops: pretraining a base on a task mixture, fine-tuning experts and the
multitask reference. One loop serves all three; what differs is the data mixture and
whether the loss covers the prompt.

Each step samples a task uniformly, then an example of it, so a mixture's tasks get equal
weight whatever their dataset sizes. Examples are ``prompt + answer + "\\n"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20  # short linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # experts stay close to the base: that is what merging needs
    grad_clip: float = 1.0
    seed: int = 0
    loss_on: str = "answer"  # "answer": fine-tuning; "all": pretraining on whole texts
    log_every: int = 25
    chat_template: bool = False  # format examples with the tokenizer's chat template
    # Share of every batch drawn from a replay mixture (the base's pretraining data):
    # an expert that keeps seeing the other skills keeps answering their keywords.
    replay: float = 0.0

    def __post_init__(self):
        if self.loss_on not in ("answer", "all"):
            raise ValueError(f"loss_on must be 'answer' or 'all', not {self.loss_on!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay must be a share of the batch in [0, 1), not {self.replay!r}")

    @property
    def replay_per_batch(self) -> int:
        return round(self.replay * self.batch_size)


def chat_texts(tokenizer, prompt: str, answer: str) -> tuple[str, str]:
    """(context, completion) of one example rendered by the tokenizer's chat template.

    The context is what lm-eval feeds the model with ``apply_chat_template`` (the user turn
    plus the assistant header); the completion is the answer and the end-of-turn text.
    """
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    user = [{"role": "user", "content": prompt}]
    context = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(context):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r}: the chat template renders a conversation "
            f"that does not start with its own generation prompt; cannot split off the answer"
        )
    return context, full[len(context):]


def encode(tokenizer, rows: list[dict], loss_on: str,
           chat_template: bool = False) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example; labels hide the prompt when loss_on='answer'."""
    out = []
    for row in rows:
        if chat_template:
            context, completion = chat_texts(tokenizer, row["prompt"], row["answer"])
        else:
            context, completion = row["prompt"], row["answer"] + "\n"
        # Context and completion are tokenised apart, as lm-eval tokenises the context.
        prompt_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids
        if loss_on == "answer":
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        else:
            labels = list(ids)
        out.append((ids, labels))
    return out


def collate(batch, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):  # right padding: positions stay 0..n-1
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    tokenizer,
    rows_by_task: dict[str, list[dict]],
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    replay_by_task: dict[str, list[dict]] | None = None,
) -> dict:
    """Train ``model`` in place on a uniform mixture of ``rows_by_task``; return a summary.

    With ``cfg.replay`` > 0, that share of every batch is drawn (tasks uniformly) from
    ``replay_by_task`` instead, with the same loss. ``after_backward`` runs once the gradients exist (before clipping), ``after_step``
    after each optimiser step: e.g. to keep pruned weights at zero (mergescale.studies.sparse_soups.cycle).
    """
    if not rows_by_task or any(not rows for rows in rows_by_task.values()):
        empty = [t for t, rows in rows_by_task.items() if not rows]
        raise ValueError(f"no training examples for task(s): {empty or 'none given'}")
    encoded = {task: encode(tokenizer, rows, cfg.loss_on, cfg.chat_template)
               for task, rows in rows_by_task.items()}
    tasks = sorted(encoded)
    n_replay = cfg.replay_per_batch
    if n_replay and not replay_by_task:
        raise ValueError(f"replay {cfg.replay} asks for a replay mixture, and none was given")
    if replay_by_task and any(not rows for rows in replay_by_task.values()):
        raise ValueError(f"no replay examples for task(s): "
                         f"{[t for t, rows in replay_by_task.items() if not rows]}")
    replay_tasks = sorted(replay_by_task or {}) if n_replay else []
    replay_cache: dict[tuple[str, int], tuple[list[int], list[int]]] = {}

    def replay_example(task: str, i: int):  # encoded when drawn: the mixture is large
        if (task, i) not in replay_cache:
            row = replay_by_task[task][i]
            replay_cache[task, i] = encode(tokenizer, [row], cfg.loss_on, cfg.chat_template)[0]
        return replay_cache[task, i]
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: adapters only
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    start = time.perf_counter()
    recent: list[float] = []
    history = []
    for step in range(cfg.steps):
        task_idx = torch.randint(len(tasks), (cfg.batch_size - n_replay,), generator=gen).tolist()
        batch = []
        for t in task_idx:
            pool = encoded[tasks[t]]
            batch.append(pool[torch.randint(len(pool), (1,), generator=gen).item()])
        if n_replay:
            for t in torch.randint(len(replay_tasks), (n_replay,), generator=gen).tolist():
                task = replay_tasks[t]
                i = torch.randint(len(replay_by_task[task]), (1,), generator=gen).item()
                batch.append(replay_example(task, i))
        inputs = {k: v.to(device) for k, v in collate(batch, tokenizer.pad_token_id).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**inputs).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step + 1}: loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if after_step is not None:
            after_step()
        recent.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = sum(recent) / len(recent)
            history.append({"step": step + 1, "loss": mean})
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{cfg.steps}  loss {mean:.4f}  lr {lr_at(step, cfg):.2e}  "
                f"{elapsed:.1f}s")
            recent = []
    model.eval()
    return {
        "config": asdict(cfg),
        "tasks": tasks,
        **({"replay_tasks": replay_tasks} if replay_tasks else {}),
        "final_loss": history[-1]["loss"],
        "loss_history": history,
        "train_seconds": round(time.perf_counter() - start, 3),
    }
