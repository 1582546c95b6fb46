"""A merge at the scale of a 3B-parameter Llama, without a hub: time and peak memory.

Writes a random base and N experts (base + small Gaussian noise) in the shape of
Llama-3.2-3B (hidden 3072, 28 layers, MLP 8192, 24 heads / 8 KV heads, vocabulary
128256, tied embeddings: 3.21B parameters, 6.4 GB per model in bfloat16), tensor by
tensor (never a whole model in memory), then runs

    python -m mergescale.cli merge ties.yaml OUT --threads T

as a child process and prints its wall time, CPU time and peak RSS (the child's own
ru_maxrss from wait4) beside the floor: reading every input byte once. The inputs take
N + 1 times 6.4 GB of disk and the output 6.4 GB; --keep keeps them for another run,
otherwise everything is deleted at the end.

RegMean (--regmean-layers L, default 1) is measured through the same engine on the first
L blocks, with Gram statistics of every linear weight streamed from statistics files
(X^T X of random activations: the cost does not depend on the values), and extrapolated
to all blocks; four experts' Grams for all 28 blocks would take 55 GB of disk.

Usage: python benchmarks/merge_scale.py [--experts 4] [--threads 2] [--keep]
       python benchmarks/merge_scale.py --keep --skip-ties --regmean-layers 2
       python benchmarks/merge_scale.py --layers 1 --vocab 8192 --experts 2   # a quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import read_floor, run_measured  # noqa: E402

from mergescale.merge.output import ShardedWriter  # noqa: E402
from mergescale.merge.safetensors_io import PlannedTensor  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)


def _generator(name: str, salt: int) -> torch.Generator:
    digest = hashlib.sha256(f"{salt}\x00{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:
        return 1 + 0.02 * torch.randn(shape, generator=_generator(name, 0))
    return 0.02 * torch.randn(shape, generator=_generator(name, 0))


def build_models(root: Path, n_experts: int, noise: float = 0.002, **shape) -> tuple[Path, list[Path]]:
    """Base and experts as sharded bf16 safetensors, tensor by tensor; cached."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = [root / "base"] + [root / f"expert{i}" for i in range(n_experts)]
    if all((p / "done").is_file() for p in paths):
        return paths[0], paths[1:]
    config = LlamaConfig(**{**SHAPE, **shape}, max_position_embeddings=4096, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    plan = [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"writing base + {n_experts} experts of {n_params / 1e9:.2f}B parameters to {root}", flush=True)
    for i, path in enumerate(paths):
        if (path / "done").is_file():
            continue
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        config.save_pretrained(path)
        writer = ShardedWriter(path, plan, 5 * 10**9)
        for name, shape in shapes.items():
            t = _base_tensor(name, shape)
            if i > 0:
                t.add_(torch.randn(shape, generator=_generator(name, i)), alpha=noise)
            writer.write(name, t.to(torch.bfloat16))
            del t
        writer.close()
        (path / "done").write_text("")
        print(f"  {path.name} written", flush=True)
    return paths[0], paths[1:]


def write_regmean_inputs(root: Path, experts: list[Path], layers: int, tokens: int) -> tuple[list[Path], list[Path]]:
    """The first `layers` transformer blocks of each expert as a checkpoint of their
    own, and Gram statistics for every linear weight in them, in the files the
    compute_stats rule writes: X^T X of `tokens` rows of random activations (a merge's
    cost does not depend on the values; forward passes of four 3B models do not fit
    this machine's memory beside the merge)."""
    from safetensors.torch import save_file

    from mergescale.merge.checkpoint import Checkpoint
    from mergescale.merge.ops import layer_index
    from mergescale.merge.statistics import GRAM_FILE, TOKENS_KEY

    parts, stats = [], []
    for i, expert in enumerate(experts):
        part, stat = root / f"regmean_part{i}", root / f"regmean_stats{i}"
        for d in (part, stat):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        with Checkpoint(expert) as c:
            state = {n: c.read(n) for n in c.names if layer_index(n) is not None and layer_index(n) < layers}
        save_file(state, str(part / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(expert / "config.json", part / "config.json")
        g = torch.Generator().manual_seed(i)
        grams = {}
        for name, t in state.items():
            if t.dim() == 2:
                x = torch.randn(tokens, t.shape[1], generator=g)
                grams[name] = x.T @ x
        grams[TOKENS_KEY] = torch.tensor([tokens], dtype=torch.int64)
        save_file(grams, str(stat / GRAM_FILE))
        parts.append(part)
        stats.append(stat)
        del state, grams
    return parts, stats


def measure_regmean(root: Path, experts: list[Path], layers: int, tokens: int, threads: int) -> dict:
    """RegMean of the first `layers` blocks through the merge engine (Grams streamed from
    the statistics files tensor by tensor), as a child process: wall, CPU, peak RSS."""
    parts, stats = write_regmean_inputs(root, experts, layers, tokens)
    out = root / "regmean_out"
    shutil.rmtree(out, ignore_errors=True)
    code = ("import sys, json; from mergescale.merge import MergeRequest, run_merge; a = json.loads(sys.argv[1]); "
            "run_merge(MergeRequest(method='regmean', experts=a['experts'], stats=a['stats'], out_dir=a['out'], "
            "threads=a['threads'], progress=False))")
    args = json.dumps({"experts": [str(p) for p in parts], "stats": [str(p) for p in stats], "out": str(out),
                       "threads": threads})
    wall, rss, cpu = run_measured([sys.executable, "-c", code, args], root / "regmean.log")
    gram_bytes = sum(f.stat().st_size for d in stats for f in d.glob("*.safetensors"))
    for d in [*parts, *stats, out]:
        shutil.rmtree(d, ignore_errors=True)
    return {"layers": layers, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": rss,
            "gram_bytes": gram_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--root", type=Path, default=HERE / ".cache" / "llama3b")
    parser.add_argument("--keep", action="store_true", help="keep the written models for another run")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="fewer layers: a quick check")
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"], help="smaller vocabulary: a quick check")
    parser.add_argument("--regmean-layers", type=int, default=1,
                        help="RegMean is measured on this many blocks and extrapolated (0: skip)")
    parser.add_argument("--regmean-tokens", type=int, default=256, help="rows of activations per Gram matrix")
    parser.add_argument("--skip-ties", action="store_true", help="only RegMean (on models kept by --keep)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    start = time.perf_counter()
    base, experts = build_models(args.root, args.experts, num_hidden_layers=args.layers, vocab_size=args.vocab)
    write_s = time.perf_counter() - start
    inputs = [base, *experts]
    input_bytes = sum(f.stat().st_size for d in inputs for f in d.glob("*.safetensors"))
    results: dict[str, object] = {"input_bytes": input_bytes, "write_s": write_s, "threads": args.threads}
    try:
        config = args.root / "ties.yaml"
        lines = ["merge_method: ties", f"base_model: {base}", "models:"]
        for e in experts:
            lines += [f"  - model: {e}", f"    parameters: {{weight: 1.0, density: {args.density}}}"]
        config.write_text("\n".join(lines + ["dtype: bfloat16", ""]))
        # inputs larger than the page cache are read from disk; the floor says how fast
        if not args.skip_ties:
            results["floor_s"] = read_floor(inputs)
            out = args.root / "ties_out"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss, cpu = run_measured(
                [sys.executable, "-m", "mergescale.cli", "merge", str(config), str(out), "--threads", str(args.threads)],
                args.root / "ties.log")
            results["ties"] = {"wall_s": wall, "peak_rss_bytes": rss, "cpu_s": cpu}
            shutil.rmtree(out, ignore_errors=True)
            print(f"TIES done: wall {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        if args.regmean_layers:
            results["regmean"] = measure_regmean(args.root, experts, args.regmean_layers, args.regmean_tokens,
                                                 args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    gib = 2**30
    print(f"inputs: base + {args.experts} experts, {input_bytes / gib:.1f} GiB bf16 (written in {write_s:.0f} s); "
          f"{args.threads} threads")
    if "floor_s" in results:
        print(f"floor (read every input byte once): {results['floor_s']:.1f} s")
    if "ties" in results:
        r = results["ties"]
        print(f"TIES (density {args.density}): wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
              f"peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB")
    if "regmean" in results:
        r = results["regmean"]
        per_layer = r["wall_s"] / r["layers"]
        print(f"RegMean, {r['layers']} of {args.layers} blocks ({r['tokens']} tokens per Gram, "
              f"{r['gram_bytes'] / gib:.2f} GiB of Grams streamed): wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
              f"peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB; all {args.layers} blocks extrapolated: "
              f"{per_layer * args.layers / 60:.1f} min (embeddings, averaged, not included)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
