"""Prototype: instruct-tune the size-s base under options; held-out zero-shot on validation."""
import sys, time
import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experts import base, score, fine, HELD_OUT, families_with_role, data, TrainConfig, train
import copy, torch, json
shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
bm, tok = base("tiny-s", shape, 1500)
b = score(bm, tok, HELD_OUT); print("pretrained", b, sum(b.values())/3, flush=True)
for opt in sys.argv[1].split(","):
    st, lr, rp = opt.split(":")
    m = copy.deepcopy(bm); m.train()
    rep = {t: data(t)["train"] for t in families_with_role("pretrain")}
    t0 = time.time()
    train(m, tok, {t: data(t)["train"] for t in families_with_role("instruct")},
          TrainConfig(steps=int(st), lr=float(lr), replay=float(rp), loss_on="answer"), log=lambda s: None,
          replay_by_task=rep if float(rp) else None)
    s = score(m, tok, HELD_OUT)
    print(opt, {k: round(v, 3) for k, v in s.items()}, round(sum(s.values())/3, 3), f"{time.time()-t0:.0f}s", flush=True)
