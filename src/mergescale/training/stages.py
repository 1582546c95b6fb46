"""The workflow's training stages as plain functions over paths and dicts.

Snakemake scripts and tests call these; each writes its output directory atomically
(a killed job leaves no directory that looks finished) and records a training card.
"""

from __future__ import annotations

from pathlib import Path

import torch


from mergescale.io_utils import atomic_directory, atomic_write_json
from mergescale.models.llama import TinyShape, count_parameters, load_model, new_llama, save_model
from mergescale.tasks import ALPHABET, read_jsonl
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.training.loop import TrainConfig, train

TRAINING_CARD = "training_card.json"


def _train_rows(data_files: dict[str, Path]) -> dict[str, list[dict]]:
    return {task: read_jsonl(path) for task, path in data_files.items()}


def _save(model, tokenizer, out_dir: Path, card: dict) -> None:
    with atomic_directory(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        atomic_write_json(tmp / TRAINING_CARD, card)


def pretrain_base(shape: dict, train_cfg: dict, data_files: dict[str, Path], out_dir: Path,
                  log=print) -> dict:
    """Pretrain a tiny Llama from scratch on the whole-text mixture of ``data_files``."""
    tokenizer = build_char_tokenizer(ALPHABET)
    cfg = TrainConfig(loss_on="all", **train_cfg)
    model = new_llama(TinyShape(**shape), tokenizer, seed=cfg.seed)
    log(f"pretraining a {count_parameters(model):,}-parameter Llama on {len(data_files)} task(s)")
    summary = train(model, tokenizer, _train_rows(data_files), cfg, log=log)
    card = {"stage": "pretrain_base", "shape": shape, "parameters": count_parameters(model), **summary}
    _save(model, tokenizer, out_dir, card)
    return card


def train_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetune(base_dir: Path, train_cfg: dict, data_files: dict[str, Path], out_dir: Path,
             stage: str, log=print, chat_template: bool = False,
             replay_files: dict[str, Path] | None = None) -> dict:
    """Fine-tune ``base_dir`` on the answers of ``data_files`` (one task: an expert).

    With ``train_cfg["replay"]`` > 0, that share of every batch comes from
    ``replay_files`` (the base's pretraining mixture), listed in the card's
    ``replay_tasks``. A full fine-tune, or with ``train_cfg["lora"]`` LoRA adapters folded into the
    weights afterwards (mergescale.training.lora), so the output is always a full checkpoint.
    """
    train_cfg = dict(train_cfg)
    lora_cfg = train_cfg.pop("lora", None)
    model, tokenizer = load_model(base_dir)
    model.to(train_device())
    cfg = TrainConfig(loss_on="answer", chat_template=chat_template, **train_cfg)
    if lora_cfg is not None:
        from mergescale.training.lora import ADAPTER_DIR, LoraSpec, add_lora, fold_lora, trainable_parameters

        model = add_lora(model, LoraSpec.from_config(lora_cfg), seed=cfg.seed)
        log(f"LoRA: {trainable_parameters(model):,} trainable parameters")
    kind = "LoRA" if lora_cfg is not None else "full"
    log(f"{stage}: {kind} fine-tuning {base_dir} on {', '.join(sorted(data_files))} "
        f"({train_device()})")
    replay = _train_rows(replay_files) if cfg.replay and replay_files else None
    summary = train(model, tokenizer, _train_rows(data_files), cfg, log=log, replay_by_task=replay)
    card = {"stage": stage, "base": str(base_dir), **summary}
    if lora_cfg is not None:
        card["lora"] = lora_cfg
    with atomic_directory(out_dir) as tmp:
        if lora_cfg is not None:
            model = fold_lora(model, tmp / ADAPTER_DIR)
        save_model(model.to("cpu"), tokenizer, tmp)
        atomic_write_json(tmp / TRAINING_CARD, card)
    return card
