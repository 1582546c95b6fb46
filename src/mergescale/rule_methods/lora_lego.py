"""LoRA-LEGO (Zhao et al., 2024, "Merging LoRAs like Playing LEGO: Pushing the Modularity
of LoRA to Extremes Through Rank-Wise Clustering", https://arxiv.org/abs/2409.16167).

A LoRA update of one module is a sum of rank-one parts, scale * sum_i b_i a_i^T
(b_i: column i of B, a_i: row i of A). Each part is a "minimal semantic unit" (MSU),
represented for clustering by the concatenation [a_i, b_i]. Per target module:

    pool      the r units of every expert's adapter (n * r vectors)
    cluster   k-means into k clusters (k: the target rank, default r)
    average   the centroid of a cluster is a new unit (a_c, b_c)
    rescale   parameter reweighting: averaging units that point apart shrinks them
              ("norm decay"), so a_c and b_c are rescaled to the mean norm of their
              members' a_i and b_i; output reweighting: a rank-k sum of units has about
              k/r times the output variance of a rank-r adapter, so the update is
              multiplied by sqrt(r / k) (1 at the default k = r)
    apply     W = W0 + scale * sqrt(r / k) * B' A'

k-means starts from farthest-point seeds (the unit of largest norm, then repeatedly
the unit farthest from the seeds chosen): no random numbers, independent of the order
of the units, and when the pool holds n copies of the same r distinct units (identical
adapters) the seeds are exactly those units, so the merge returns that adapter.
Distances are computed directly (not by the matrix-product expansion) so identical
units are at distance exactly 0.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from mergescale.training.lora import ADAPTER_DIR
from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import Hyperparameter, check_hyperparameters
from mergescale.rule_methods.registry import RuleJob, register_rule_method

PAPER = "https://arxiv.org/abs/2409.16167"
DESCRIPTION = ("LoRA-LEGO: the rank-one units of every expert's LoRA adapter clustered by k-means into "
               "the target rank, averaged and rescaled per cluster, and applied to the base.")
HYPERPARAMETERS = (
    Hyperparameter("rank", "int", 0, "Rank of the merged adapter (clusters per module); 0: the experts' r.",
                   low=0),
    Hyperparameter("iters", "int", 50, "k-means iterations at most (it stops when no unit moves).", low=1),
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Adapter:
    """One expert's LoRA adapter: per target module (the base tensor it updates) A and B."""

    path: Path
    r: int
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    lora_a: dict[str, torch.Tensor]  # base tensor name -> A (r, d_in)
    lora_b: dict[str, torch.Tensor]  # base tensor name -> B (d_out, r)

    def delta(self, name: str) -> torch.Tensor:
        return self.scale * self.lora_b[name] @ self.lora_a[name]


def read_adapter(expert_dir: Path | str) -> Adapter:
    """The adapter a LoRA fine-tune saved in ``<expert_dir>/adapter/`` (peft format)."""
    from safetensors.torch import load_file

    folder = Path(expert_dir) / ADAPTER_DIR
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise MergeInputError(
            f"{expert_dir}: no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_CONFIG} and {ADAPTER_DIR}/{ADAPTER_WEIGHTS}); "
            f"LoRA-LEGO merges experts fine-tuned with finetune.expert.lora")
    config = json.loads(config_path.read_text())
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise MergeInputError(f"{config_path}: no {key!r}")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    a, b = {}, {}
    for key, tensor in load_file(weights_path).items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise MergeInputError(f"{weights_path}: tensor {key} is not a LoRA A or B matrix")
        (a if kind == "A.weight" else b)[f"{module}.weight"] = tensor.float()
    if not a or set(a) != set(b):
        raise MergeInputError(f"{weights_path}: A and B matrices do not pair up "
                              f"({len(a)} A, {len(b)} B)")
    for name in a:
        if a[name].shape[0] != r or b[name].shape[1] != r:
            raise MergeInputError(f"{weights_path}: {name}: A {tuple(a[name].shape)}, B {tuple(b[name].shape)} "
                                  f"do not have rank r={r}")
    return Adapter(Path(expert_dir), r, scale, a, b)


def check_compatible(adapters: list[Adapter]) -> None:
    """Same r, scale and target modules (and shapes) in every adapter; errors name both."""
    first = adapters[0]
    for other in adapters[1:]:
        where = f"{other.path} vs {first.path}"
        if other.r != first.r:
            raise MergeInputError(f"{where}: adapters of rank {other.r} and {first.r}; LoRA-LEGO needs one r")
        if not math.isclose(other.scale, first.scale):
            raise MergeInputError(f"{where}: adapters with scale (lora_alpha / r) {other.scale:g} and "
                                  f"{first.scale:g}")
        if set(other.lora_a) != set(first.lora_a):
            diff = sorted(set(other.lora_a) ^ set(first.lora_a))
            raise MergeInputError(f"{where}: different target modules ({', '.join(diff[:4])})")
        for name in first.lora_a:
            if (other.lora_a[name].shape != first.lora_a[name].shape
                    or other.lora_b[name].shape != first.lora_b[name].shape):
                raise MergeInputError(f"{where}: {name}: LoRA matrices of different shapes")


# -- the algorithm, one module at a time --------------------------------------------


def farthest_point_seeds(units: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k seeds: the largest-norm unit, then each time the farthest from the seeds."""
    chosen = [int(units.norm(dim=1).argmax())]
    nearest = _distances(units, units[chosen]).squeeze(1)
    for _ in range(k - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, _distances(units, units[chosen[-1:]]).squeeze(1))
    return torch.tensor(chosen)


def _distances(units: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(units, centroids, compute_mode="donot_use_mm_for_euclid_dist")


def kmeans(units: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Cluster index of each unit (Lloyd's algorithm from farthest-point seeds)."""
    centroids = units[farthest_point_seeds(units, k)]
    assign = _distances(units, centroids).argmin(dim=1)
    for _ in range(iters):
        # an empty cluster keeps its centroid; a seed is its own nearest, so this is rare
        centroids = torch.stack([units[assign == c].mean(0) if (assign == c).any() else centroids[c]
                                 for c in range(k)])
        new = _distances(units, centroids).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def _rescaled_mean(vectors: torch.Tensor) -> torch.Tensor:
    """The mean of the rows, rescaled to their mean norm (parameter reweighting)."""
    mean = vectors.mean(0)
    norm = mean.norm()
    if norm <= torch.finfo(mean.dtype).tiny:
        return mean  # units that cancel out: nothing to rescale
    return mean * (vectors.norm(dim=1).mean() / norm)


def lego_module(a_list: list[torch.Tensor], b_list: list[torch.Tensor], rank: int,
                iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged (A' (rank, d_in), B' (d_out, rank)) of one module from the experts' A and B
    (before the output reweighting), and each unit's cluster."""
    d_in = a_list[0].shape[1]
    units = torch.cat([torch.cat([a, b.T], dim=1) for a, b in zip(a_list, b_list)])
    if rank > len(units):
        raise MergeInputError(f"LoRA-LEGO rank {rank} exceeds the {len(units)} units to cluster")
    assign = kmeans(units, rank, iters)
    merged_a, merged_b = [], []
    for c in range(rank):
        members = units[assign == c]
        if not len(members):  # an emptied cluster contributes nothing
            members = torch.zeros_like(units[:1])
        merged_a.append(_rescaled_mean(members[:, :d_in]))
        merged_b.append(_rescaled_mean(members[:, d_in:]))
    return torch.stack(merged_a), torch.stack(merged_b, dim=1), assign


@dataclass
class LegoResult:
    rank: int
    scale: float  # of B'A' in the merged update (the experts' scale x output reweighting)
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    cluster_sizes: dict[str, list[int]]

    def delta(self, name: str) -> torch.Tensor:
        return self.scale * self.lora_b[name] @ self.lora_a[name]


def lora_lego(adapters: list[Adapter], rank: int = 0, iters: int = 50) -> LegoResult:
    """LoRA-LEGO of ``adapters`` (module doc); ``rank`` 0 means the adapters' r."""
    if not adapters:
        raise MergeInputError("LoRA-LEGO needs at least one adapter")
    check_compatible(adapters)
    r = adapters[0].r
    rank = rank or r
    lora_a, lora_b, sizes = {}, {}, {}
    for name in sorted(adapters[0].lora_a):
        lora_a[name], lora_b[name], assign = lego_module(
            [ad.lora_a[name] for ad in adapters], [ad.lora_b[name] for ad in adapters], rank, iters)
        sizes[name] = torch.bincount(assign, minlength=rank).tolist()
    return LegoResult(rank, adapters[0].scale * math.sqrt(r / rank), lora_a, lora_b, sizes)


# -- the workflow job ----------------------------------------------------------------


def check_lora_bases(config: dict, method: str) -> None:
    """Every base merge.methods.<method> runs on fine-tunes LoRA experts (or fetches its
    experts, whose adapters are checked when merging); else a ConfigError naming the key."""
    from mergescale.errors import ConfigError
    from mergescale.sources.grid import finetune_settings

    cross_b = (config.get("cross_seed") or {}).get("base_b")
    grid = [b for b in config["bases"] if b != cross_b]
    for base in config["merge"]["methods"][method].get("bases", grid):
        if "lora" not in finetune_settings(config, base, "expert") and not config["bases"][base].get("experts"):
            raise ConfigError(
                f"config key merge.methods.{method}.bases: base {base} fine-tunes full experts (no lora "
                f"in finetune.expert or bases.{base}.finetune.expert); LoRA-LEGO merges LoRA adapters")



def save_adapter(result: LegoResult, like: Path, out_dir: Path) -> None:
    """The merged adapter in peft's format (rank k, lora_alpha such that alpha / r = scale)."""
    from safetensors.torch import save_file

    config = json.loads((like / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    config.update(r=result.rank, lora_alpha=result.scale * result.rank, use_rslora=False)
    config.pop("rank_pattern", None), config.pop("alpha_pattern", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in result.lora_a:
        module = PEFT_PREFIX + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = result.lora_a[name].contiguous()
        tensors[f"{module}.lora_B.weight"] = result.lora_b[name].contiguous()
    save_file(tensors, out_dir / ADAPTER_WEIGHTS)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def merge_lora_lego(base_dir: Path | str, expert_dirs: list[Path | str], out_dir: Path | str,
                    params: Mapping, seed: int = 0, dtype: str = "float32",
                    log: Callable[[str], None] = print) -> dict:
    """LoRA-LEGO of the experts' adapters applied to ``base_dir`` -> ``out_dir``: a full
    checkpoint, the merged adapter in ``adapter/`` and the merge card."""
    from mergescale.merge.in_memory import load_state, open_checkpoints, write_merged_checkpoint

    start = time.perf_counter()
    params = check_hyperparameters(HYPERPARAMETERS, params, "rule-method lora_lego", "params.")
    base_dir, expert_dirs = Path(base_dir), [Path(e) for e in expert_dirs]
    adapters = [read_adapter(e) for e in expert_dirs]
    for c in open_checkpoints(base_dir, expert_dirs):  # same config and tensors as the base
        c.close()
    result = lora_lego(adapters, rank=params["rank"], iters=params["iters"])
    state = {n: t.float() if t.is_floating_point() else t for n, t in load_state(base_dir).items()}
    for name in result.lora_a:
        if name not in state or state[name].shape != result.lora_b[name].shape[:1] + result.lora_a[name].shape[1:]:
            raise MergeInputError(f"{expert_dirs[0] / ADAPTER_DIR}: adapter for {name} does not fit "
                                  f"the base {base_dir} ({tuple(state[name].shape) if name in state else 'missing'})")
        state[name] = state[name] + result.delta(name)
    units = sum(ad.r for ad in adapters)
    card = write_merged_checkpoint(state, base_dir, Path(out_dir), {
        "method": "lora_lego", "description": DESCRIPTION, "paper": PAPER,
        "params": {"rank": result.rank, "iters": params["iters"]},
        "base": {"path": str(base_dir.resolve())},
        "experts": [{"path": str(e.resolve()), "params": {"r": ad.r, "scale": ad.scale}}
                    for e, ad in zip(expert_dirs, adapters)],
        "seed": seed, "units_per_module": units, "merged_scale": result.scale,
        "cluster_sizes": result.cluster_sizes,
    }, dtype=dtype, started=start,
        write_extra=lambda tmp: save_adapter(result, expert_dirs[0], tmp / ADAPTER_DIR))
    log(f"lora_lego: {units} units per module of {len(adapters)} adapter(s) -> rank {result.rank} "
        f"in {card['wall_time_s']:.2f}s -> {out_dir}")
    return card


@register_rule_method(
    name="lora_lego",
    hyperparameters=HYPERPARAMETERS,
    paper=PAPER,
    description=DESCRIPTION,
    needs=("lora_adapters",),
    check_config=check_lora_bases,
)
def run(job: RuleJob) -> dict:
    return merge_lora_lego(base_dir=job.base, expert_dirs=job.experts, out_dir=job.out_dir,
                           params=job.params, seed=job.seed, dtype=job.dtype, log=job.log)
