"""Time and memory of a TIES merge: mergescale vs mergekit, on the same YAML.

Builds (once, cached under benchmarks/.cache/) a random-weight Llama base of ~270M
parameters in bfloat16 and N experts (base + small Gaussian noise), then runs

    mergescale: python -m mergescale.cli merge ties.yaml OUT
    mergekit:   <mergekit venv>/bin/mergekit-yaml ties.yaml OUT

each as a child process, and prints wall time, peak RSS (the child's ru_maxrss from
wait4), their ratio, and the floor: the time to read every input byte once from the
page cache. Finally it checks that the two merged models agree within bfloat16
rounding (mergekit computes in bfloat16, mergescale in float32).

With --methods, it then merges the first --method-layers layers (plus embeddings and
output head, through a `slices:` config) with every data-free method in this process
and prints each one's throughput, GB of input read and merged per second, beside the
read floor's.

mergekit lives in its own virtual environment because its pins may conflict:
    python3 -m venv benchmarks/.cache/mergekit-venv
    benchmarks/.cache/mergekit-venv/bin/pip install mergekit==0.1.5 torch==2.13.0

Usage: python benchmarks/merge_speed.py [--experts 4] [--density 0.2] [--skip-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
# ~271M parameters: 2 x 32000 x 1024 (embeddings, lm_head) + 16 x 12.85M (layers)
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000)


def build_models(root: Path, n_experts: int, noise: float = 0.002) -> tuple[Path, list[Path]]:
    """Random base and base+noise experts, bf16, single-file safetensors; cached."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, experts = root / "base", [root / f"expert{i}" for i in range(n_experts)]
    if all((p / "model.safetensors").is_file() and (p / "config.json").is_file() for p in [base, *experts]):
        return base, experts
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False, max_position_embeddings=2048, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):  # shapes only, no memory
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"building base + {n_experts} experts of {n_params / 1e6:.0f}M parameters in {root}", flush=True)

    gen = torch.Generator().manual_seed(0)
    base_state = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms start at one
            base_state[name] = (1 + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        else:
            base_state[name] = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    for i, path in enumerate([base, *experts]):
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        if i == 0:
            state = base_state
        else:
            g = torch.Generator().manual_seed(1000 + i)
            state = {k: (v.float() + noise * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                     for k, v in base_state.items()}
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        del state
    return base, experts


def write_config(path: Path, base: Path, experts: list[Path], density: float, compute_dtype: str = "bfloat16") -> None:
    """mergekit's YAML; `dtype` is mergekit's compute dtype (mergescale always computes
    in float32), the output is bfloat16 either way."""
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters:", "      weight: 1.0", f"      density: {density}"]
    lines += ["parameters:", "  normalize: true", f"dtype: {compute_dtype}"]
    if compute_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    path.write_text("\n".join(lines + [""]))


def run_measured(cmd: list[str], log: Path) -> tuple[float, int, float]:
    """Run cmd as a child; return (wall seconds, peak RSS bytes, CPU seconds) of the child."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not all children's
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def read_floor(dirs: list[Path]) -> float:
    """Seconds to read every input byte once (page cache warm after the first pass)."""
    buf = bytearray(64 * 2**20)
    start = time.perf_counter()
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - start


def compare(ours: Path, others: list[Path], base_dir: Path, expert_dirs: list[Path],
            density: float) -> list[dict[str, float]]:
    """Agreement of TIES outputs with ours, tensor by tensor (one dict per other output).

    TIES keeps the k largest |tau_i| of each expert; in bf16 checkpoints many entries
    share the threshold magnitude exactly, and which of them are kept is arbitrary
    (mergescale: lowest index; mergekit: argsort's order). TIES is elementwise after the
    trim, so every entry where no expert sits exactly at its threshold must agree within
    bf16 rounding; the tied entries are counted separately.
    """
    def handles(d):
        return {n: f for f in sorted(d.glob("*.safetensors")) for n in safe_open(f, "pt").keys()}

    def load(files, name):
        with safe_open(files[name], "pt") as f:
            return f.get_tensor(name).float().reshape(-1)

    a_files, base_files = handles(ours), handles(base_dir)
    other_files = [handles(d) for d in others]
    expert_files = [handles(d) for d in expert_dirs]
    for files, d in zip(other_files, others):
        if set(files) != set(a_files):
            raise SystemExit(f"{d}: tensor names differ: {sorted(set(a_files) ^ set(files))[:5]}")
    total = tied = 0
    within = [0] * len(others)
    untied_within = [0] * len(others)
    for name in sorted(a_files):
        a, base = load(a_files, name), load(base_files, name)
        n = a.numel()
        k = max(1, int(density * n))
        at_threshold = torch.zeros(n, dtype=torch.bool)
        for files in expert_files:
            magnitude = (load(files, name) - base).abs_()
            at_threshold |= magnitude == torch.kthvalue(magnitude, n - k + 1).values
        total += n
        tied += int(at_threshold.sum())
        for j, files in enumerate(other_files):
            b = load(files, name)
            # two bf16 ulps at the larger magnitude (bf16 has 8 significant bits)
            close = (a - b).abs() <= 2 * torch.maximum(a.abs(), b.abs()) * 2.0**-8
            within[j] += int(close.sum())
            untied_within[j] += int((close & ~at_threshold).sum())
    return [
        {
            "fraction_within_2_bf16_ulps": within[j] / total,
            "fraction_at_a_trim_threshold_tie": tied / total,
            "untied_fraction_within_2_bf16_ulps": untied_within[j] / (total - tied),
        }
        for j in range(len(others))
    ]


def method_throughput(base: Path, experts: list[Path], threads: int, layers: int, floor_gbps: float) -> list[dict]:
    """GB of input per second of every data-free method, on the first `layers` layers."""
    from mergescale.merge import list_methods, run_merge
    from mergescale.merge.config import parse_merge_config

    torch.set_num_threads(threads)
    rows = []
    print(f"data-free methods, first {layers} layers + embeddings + head, {threads} threads "
          f"(read floor {floor_gbps:.2f} GB/s):", flush=True)
    for method in list_methods():
        if method.stats or method.needs_data:
            continue
        k = min(max(method.min_experts, len(experts)), method.max_experts or len(experts))
        inputs = ([base] if method.uses_base else []) + experts[:k]
        data = {"merge_method": method.name, "dtype": "bfloat16",
                "slices": [{"sources": [{"model": str(p), "layer_range": [0, layers]} for p in inputs]}]}
        if method.uses_base:
            data["base_model"] = str(base)
        if method.hyperparameter("density") is not None:
            data["parameters"] = {"density": 0.2}
        out = CACHE / "runs" / f"throughput_{method.name}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        result = run_merge(parse_merge_config(data, out, threads=threads, progress=False))
        wall = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        read = result.card["output_bytes"] * len(inputs)  # bf16 in, bf16 out: same bytes per input
        row = {"method": method.name, "inputs": len(inputs), "input_gb": read / 1e9, "wall_s": wall,
               "gb_per_s": read / 1e9 / wall}
        rows.append(row)
        print(f"  {method.name:>18}: {len(inputs)} inputs, {row['input_gb']:.2f} GB in {wall:6.2f} s = "
              f"{row['gb_per_s']:5.2f} GB/s ({row['gb_per_s'] / floor_gbps:.0%} of the read floor)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mergekit-venv", type=Path, default=Path(os.environ.get("MERGEKIT_VENV", CACHE / "mergekit-venv")))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the second (float32-compute) mergekit run used for the agreement check")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--methods", action="store_true",
                        help="also measure every data-free method's throughput (in this process)")
    parser.add_argument("--method-layers", type=int, default=4, help="layers merged per method with --methods")
    parser.add_argument("--compare-only", action="store_true",
                        help="only compare the outputs of the previous run (benchmarks/.cache/runs)")
    args = parser.parse_args()

    root = CACHE / f"llama270m_{args.experts}experts"
    base, experts = build_models(root, args.experts)
    work = CACHE / "runs"
    if args.compare_only:
        others = ["mergekit_f32_out", "mergekit_out"]
        for other, agree in zip(others, compare(work / "mergescale_out", [work / o for o in others], base, experts,
                                                args.density)):
            print(f"vs {other}: " + ", ".join(f"{k}={v:.4g}" for k, v in agree.items()))
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "ties.yaml"
    write_config(config, base, experts, args.density)

    input_bytes = sum(f.stat().st_size for d in [base, *experts] for f in d.glob("*.safetensors"))
    read_floor([base, *experts])  # warm the page cache so both tools start equal
    floor = read_floor([base, *experts])
    results: dict[str, object] = {"input_bytes": input_bytes, "floor_s": floor, "threads": args.threads}

    ours_out = work / "mergescale_out"
    wall, rss, cpu = run_measured(
        [sys.executable, "-m", "mergescale.cli", "merge", str(config), str(ours_out), "--threads", str(args.threads)],
        work / "mergescale.log",
    )
    results["mergescale"] = {"wall_s": wall, "peak_rss_bytes": rss, "cpu_s": cpu}

    if not args.skip_mergekit:
        exe = args.mergekit_venv / "bin" / "mergekit-yaml"
        if not exe.exists():
            sys.exit(f"{exe} not found; create the venv (see this file's docstring) or pass --skip-mergekit")

        def mergekit(cfg: Path, out: Path, tag: str) -> dict[str, float]:
            wall, rss, cpu = run_measured(
                [str(exe), str(cfg), str(out), "--num-threads", str(args.threads), "--quiet", "--no-copy-tokenizer"],
                work / f"{tag}.log",
            )
            return {"wall_s": wall, "peak_rss_bytes": rss, "cpu_s": cpu}

        # the timed run: the very same YAML (mergekit computes in bf16)
        results["mergekit"] = mergekit(config, work / "mergekit_out", "mergekit")
        results["speedup"] = results["mergekit"]["wall_s"] / results["mergescale"]["wall_s"]
        # the agreement check: mergekit computing in float32 as mergescale does, so that
        # only rounding to bf16 (and its tie order in the trim) can differ
        if not args.skip_check:
            config32 = work / "ties_f32.yaml"
            write_config(config32, base, experts, args.density, compute_dtype="float32")
            results["mergekit_f32_compute"] = mergekit(config32, work / "mergekit_f32_out", "mergekit_f32")
            results["agreement"], results["agreement_with_bf16_compute"] = compare(
                ours_out, [work / "mergekit_f32_out", work / "mergekit_out"], base, experts, args.density)
        else:
            results["agreement_with_bf16_compute"], = compare(ours_out, [work / "mergekit_out"], base, experts,
                                                              args.density)

    gib = 2**30
    print(f"inputs: {len(experts)} experts + base, {input_bytes / gib:.2f} GiB bf16; TIES density {args.density}; "
          f"{args.threads} threads")
    print(f"floor (read every input byte once, page cache): {floor:.2f} s")
    for tool in ("mergescale", "mergekit", "mergekit_f32_compute"):
        if tool in results:
            r = results[tool]
            print(f"{tool:>20}: wall {r['wall_s']:7.2f} s   CPU {r['cpu_s']:7.2f} s   "
                  f"peak RSS {r['peak_rss_bytes'] / gib:6.2f} GiB")
    if "speedup" in results:
        cpu_ratio = results["mergekit"]["cpu_s"] / results["mergescale"]["cpu_s"]
        print(f"mergescale is {results['speedup']:.1f}x faster than mergekit (wall), {cpu_ratio:.1f}x less CPU time")
        loose = results["agreement_with_bf16_compute"]
        print("vs mergekit computing in bf16: " + ", ".join(f"{k}={v:.4g}" for k, v in loose.items()))
        if "agreement" in results:
            agree = results["agreement"]
            print("vs mergekit computing in float32: " + ", ".join(f"{k}={v:.4g}" for k, v in agree.items()))
            ok = agree["untied_fraction_within_2_bf16_ulps"] > 0.9999
            print("outputs agree within bf16 rounding wherever no trim threshold is tied" if ok
                  else "OUTPUTS DISAGREE beyond bf16 rounding")
    if args.methods:
        results["methods"] = method_throughput(base, experts, args.threads, args.method_layers,
                                               input_bytes / 1e9 / floor)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine slows every tool)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
