"""How far experts move from their base, and how their moves relate.

Merging works when experts stay in their base's basin: task vectors tau_i = theta_i -
theta_base small next to the base's weights and close to orthogonal to each other
(Ilharco et al. 2023; Yadav et al. 2024). This module measures both, one tensor at a
time, so the memory is a few tensors times the number of experts whatever the model size.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from safetensors import safe_open


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a checkpoint directory (sharded or not)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file")
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name).to(torch.float32)


def task_vector_stats(base_dir: Path, expert_dirs: dict[str, Path]) -> dict:
    """{"base_norm", "experts": {task: {"norm", "relative_norm"}}, "cosine": {"a|b": c}}.

    relative_norm = ||tau_task|| / ||theta_base|| over every tensor the base has;
    cosine is between the flattened task vectors of two experts."""
    base_files = _tensor_files(base_dir)
    expert_files = {task: _tensor_files(d) for task, d in expert_dirs.items()}
    for task, files in expert_files.items():
        missing = sorted(set(base_files) - set(files))
        if missing:
            raise ValueError(f"expert {expert_dirs[task]}: tensor {missing[0]} of the base is missing")
    tasks = sorted(expert_dirs)
    base_sq = 0.0
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for name, path in base_files.items():
        base = _read(path, name)
        base_sq += float(base.double().pow(2).sum())
        tau = torch.stack([(_read(expert_files[t][name], name) - base).flatten() for t in tasks])
        gram += (tau.double() @ tau.double().T)
    norms = gram.diagonal().sqrt()
    base_norm = math.sqrt(base_sq)
    cosine = {}
    for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
        den = float(norms[i] * norms[j])
        cosine[f"{a}|{b}"] = float(gram[i, j]) / den if den > 0 else float("nan")
    return {
        "base_norm": base_norm,
        "experts": {t: {"norm": float(norms[i]), "relative_norm": float(norms[i]) / base_norm}
                    for i, t in enumerate(tasks)},
        "cosine": cosine,
    }


def stats_rows(base: str, stats: dict) -> list[dict]:
    """One row per base: mean and range of the relative norms and of the pairwise cosines."""
    rel = [e["relative_norm"] for e in stats["experts"].values()]
    cos = list(stats["cosine"].values())
    return [{
        "base": base, "experts": len(rel),
        "relative_norm_mean": sum(rel) / len(rel), "relative_norm_min": min(rel),
        "relative_norm_max": max(rel),
        "cosine_mean": sum(cos) / len(cos) if cos else float("nan"),
        "cosine_min": min(cos) if cos else float("nan"),
        "cosine_max": max(cos) if cos else float("nan"),
    }]


def stats_markdown(stats_by_base: dict[str, dict]) -> str:
    """The task-vector table of every base (results/tables/task_vectors.md)."""
    import pandas as pd

    from mergescale.report.aggregate import markdown_table

    rows = [row for base, stats in sorted(stats_by_base.items()) for row in stats_rows(base, stats)]
    per_expert = [{"base": base, "expert": task, "relative_norm": e["relative_norm"]}
                  for base, stats in sorted(stats_by_base.items())
                  for task, e in stats["experts"].items()]
    return "\n".join([
        "# Task vectors", "",
        "||theta_expert - theta_base|| / ||theta_base|| per expert, and the cosine similarity "
        "between two experts' task vectors (mean, min, max over pairs).", "",
        markdown_table(pd.DataFrame(rows).round(3)), "",
        markdown_table(pd.DataFrame(per_expert).round(3)), ""])
