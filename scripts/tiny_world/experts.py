"""Validation measurements of docs/tiny-world.md (run from the repository root with PYTHONPATH=src):
pretrain the size-s base, fine-tune experts under options (steps:lr:replay), merge all 15
pairs by task arithmetic (lambda 0.5, 0.7, 1.0; average = 0.5), score greedy exact match on
validation. Example: python scripts/tiny_world/experts.py --options 150:1e-3:0.5
"""
import copy, itertools, json, sys, time, argparse
from pathlib import Path
import torch
from mergescale.tasks.families import families_with_role
from mergescale.tasks.splits import make_splits
from mergescale.training.stages import pretrain_base, finetune as _ft
from mergescale.models.llama import load_model
from mergescale.training.loop import TrainConfig, train
from mergescale.merge.data_aware import exact_match

torch.set_num_threads(1)
HELD_IN = ["first_letter", "last_letter", "reverse_word", "next_letter", "larger_number", "smaller_number"]
HELD_OUT = ["second_letter", "min_digit", "word_length"]
SIZES = {"train": 2000, "validation": 100, "test": 200}
_cache = {}
def data(task):
    if task not in _cache:
        _cache[task] = make_splits(task, SIZES, seed=0)
    return _cache[task]

def base(name, shape, steps, lr=3e-3, seed=0, root=Path("results/tiny_world/bases")):
    out = root / name
    if not out.exists():
        tmp = root / "data"; tmp.mkdir(parents=True, exist_ok=True)
        from mergescale.tasks.splits import write_jsonl
        files = {}
        for t in families_with_role("pretrain"):
            p = tmp / f"{t}.jsonl"
            if not p.exists(): write_jsonl(data(t)["train"], p)
            files[t] = p
        t0 = time.time()
        pretrain_base(shape, {"steps": steps, "batch_size": 64, "lr": lr, "seed": seed}, files, out, log=lambda m: None)
        print(f"# pretrain {name}: {time.time()-t0:.1f}s", flush=True)
    return load_model(out)

def score(model, tok, tasks, split="validation"):
    return {t: exact_match(model, tok, data(t)[split]) for t in tasks}

def fine(model, tok, tasks, steps, lr, replay=0.0, seed=0):
    m = copy.deepcopy(model); m.train()
    rep = {t: data(t)["train"] for t in families_with_role("pretrain")} if replay else None
    cfg = TrainConfig(steps=steps, lr=lr, replay=replay, seed=seed, loss_on="answer")
    t0 = time.time()
    train(m, tok, {t: data(t)["train"] for t in tasks}, cfg, log=lambda s: None, replay_by_task=rep)
    return m, time.time() - t0

def state(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}

def ties(base_sd, sds, lam, density=0.2):
    out = {}
    for k, b in base_sd.items():
        tv = torch.stack([sd[k] - b for sd in sds])
        flat = tv.reshape(len(sds), -1)
        n = flat.shape[1]; keep = max(1, int(round(density * n)))
        thr = flat.abs().kthvalue(n - keep + 1, dim=1, keepdim=True).values
        flat = torch.where(flat.abs() >= thr, flat, torch.zeros_like(flat))
        sign = torch.sign(flat.sum(0))
        agree = (torch.sign(flat) == sign) & (flat != 0)
        num = (flat * agree).sum(0); den = agree.sum(0).clamp(min=1)
        out[k] = b + lam * (num / den).reshape(b.shape)
    return out

def ta(base_sd, sds, lam):
    return {k: b + lam * sum(sd[k] - b for sd in sds) for k, b in base_sd.items()}

def run(label, bmodel, tok, steps, lr, replay, methods=("ta",), tasks=HELD_IN):
    bsd = state(bmodel)
    b_scores = score(bmodel, tok, tasks)
    experts, e_scores, secs = {}, {}, []
    for t in tasks:
        m, s = fine(bmodel, tok, [t], steps, lr, replay); secs.append(s)
        experts[t] = state(m); e_scores[t] = score(m, tok, [t])[t]
    norms = {t: (sum(((experts[t][k]-bsd[k])**2).sum() for k in bsd)**0.5 / sum((bsd[k]**2).sum() for k in bsd)**0.5).item() for t in tasks}
    work = copy.deepcopy(bmodel)
    res = {m: [] for m in methods}
    pairs = {}
    for a, b in itertools.combinations(tasks, 2):
        sds = [experts[a], experts[b]]
        row = {}
        for meth in methods:
            best = None
            grid = [0.5] if meth == "avg" else ([0.5, 0.7, 1.0])
            for lam in grid:
                sd = ta(bsd, sds, lam) if meth in ("avg", "ta") else ties(bsd, sds, lam)
                work.load_state_dict(sd)
                s = score(work, tok, [a, b])
                v = (s[a] / max(e_scores[a], 1e-9) + s[b] / max(e_scores[b], 1e-9)) / 2
                if best is None or v > best: best = v
                if meth == "ta" and lam == 0.5: row["avg"] = v; res.setdefault("avg", []).append(v)
            row[meth] = best; res[meth].append(best)
        pairs[f"{a}+{b}"] = row
    gains = {t: e_scores[t] - b_scores[t] for t in tasks}
    summ = {"label": label, "steps": steps, "lr": lr, "replay": replay,
            "expert": e_scores, "gain_min": min(gains.values()), "norm": norms,
            "k2": {m: sum(v) / len(v) for m, v in res.items()},
            "best4_mean": sum(max(r.values()) for r in pairs.values()) / len(pairs),
            "pairs": pairs, "ft_seconds": sum(secs) / len(secs)}
    print(json.dumps({k: v for k, v in summ.items() if k != "pairs"}), flush=True)
    print("#pairs " + json.dumps({p: round(max(r.values()), 2) for p, r in pairs.items()}), flush=True)
    return summ

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--options", required=True, help="steps:lr:replay,...")
    ap.add_argument("--base", default="s")
    a = ap.parse_args()
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
    bm, tok = base("tiny-s", shape, 1500)
    print("# base held-out", score(bm, tok, HELD_OUT), flush=True)
    for opt in a.options.split(","):
        st, lr, rp = opt.split(":")
        run(opt, bm, tok, int(st), float(lr), float(rp))
