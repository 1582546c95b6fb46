"""Per-size training cost: seconds per pretraining step and per expert/multitask fine-tuning step (with replay)."""
import sys, time, copy
import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experts import data, families_with_role, TrainConfig, train, HELD_IN
import torch
from mergescale.models.llama import TinyShape, new_llama, count_parameters
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.tasks import ALPHABET
torch.set_num_threads(1)
tok = build_char_tokenizer(ALPHABET)
SHAPES = {"s": (64, 2, 4, 256), "m": (128, 4, 4, 256), "l": (256, 4, 8, 1024)}
pre = {t: data(t)["train"] for t in families_with_role("pretrain")}
for size, (h, L, a, i) in SHAPES.items():
    m = new_llama(TinyShape(h, L, a, i), tok, 0)
    n = 30
    t0 = time.process_time(); train(m, tok, pre, TrainConfig(steps=n, lr=3e-3, loss_on="all"), log=lambda s: None); p = (time.process_time() - t0) / n
    t0 = time.process_time(); train(m, tok, {"first_letter": data("first_letter")["train"]}, TrainConfig(steps=n, lr=1e-3, replay=0.5), log=lambda s: None, replay_by_task=pre); e = (time.process_time() - t0) / n
    t0 = time.process_time(); train(m, tok, {t: data(t)["train"] for t in HELD_IN}, TrainConfig(steps=n, lr=1e-3), log=lambda s: None); mt = (time.process_time() - t0) / n
    print(f"{size} params={count_parameters(m)} cpu_s/step pretrain={p:.4f} expert(replay .5)={e:.4f} multitask={mt:.4f} "
          f"-> pretrain 1500={p*1500:.0f}s expert 150={e*150:.0f}s multitask 900={mt*900:.0f}s multitask1200={mt*1200:.0f}s", flush=True)
