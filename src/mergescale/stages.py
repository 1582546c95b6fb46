"""The workflow's training stages as plain functions over paths and dicts.

Snakemake scripts and tests call these; each writes its output directory atomically
(a killed job leaves no directory that looks finished) and records a training card.
"""

from __future__ import annotations

from pathlib import Path


from mergescale.io_utils import atomic_directory, atomic_write_json
from mergescale.models import TinyShape, count_parameters, load_model, new_llama, save_model
from mergescale.tasks import ALPHABET, read_jsonl
from mergescale.tokenizer import build_char_tokenizer
from mergescale.train import TrainConfig, train

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


def finetune(base_dir: Path, train_cfg: dict, data_files: dict[str, Path], out_dir: Path,
             stage: str, log=print) -> dict:
    """Fully fine-tune ``base_dir`` on the answers of ``data_files`` (one task: an expert)."""
    model, tokenizer = load_model(base_dir)
    cfg = TrainConfig(loss_on="answer", **train_cfg)
    log(f"{stage}: fine-tuning {base_dir} on {', '.join(sorted(data_files))}")
    summary = train(model, tokenizer, _train_rows(data_files), cfg, log=log)
    card = {"stage": stage, "base": str(base_dir), **summary}
    _save(model, tokenizer, out_dir, card)
    return card
