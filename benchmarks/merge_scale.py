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

Usage: python benchmarks/merge_scale.py [--experts 4] [--threads 2] [--keep]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--root", type=Path, default=HERE / ".cache" / "llama3b")
    parser.add_argument("--keep", action="store_true", help="keep the written models for another run")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="fewer layers: a quick check")
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"], help="smaller vocabulary: a quick check")
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
        results["floor_s"] = read_floor(inputs)
        out = args.root / "ties_out"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, cpu = run_measured(
            [sys.executable, "-m", "mergescale.cli", "merge", str(config), str(out), "--threads", str(args.threads)],
            args.root / "ties.log")
        results["ties"] = {"wall_s": wall, "peak_rss_bytes": rss, "cpu_s": cpu}
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    gib = 2**30
    print(f"inputs: base + {args.experts} experts, {input_bytes / gib:.1f} GiB bf16 (written in {write_s:.0f} s); "
          f"{args.threads} threads")
    print(f"floor (read every input byte once): {results['floor_s']:.1f} s")
    r = results["ties"]
    print(f"TIES (density {args.density}): wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
          f"peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
