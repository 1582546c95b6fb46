"""Twin-Merging (Lu et al., 2024, https://arxiv.org/abs/2406.15479): a model chosen per input.

    shared      theta* = a merge of the experts by the engine (task arithmetic or TIES)
    exclusive   Delta_i = theta_i - theta*, per weight matrix compressed to rank r by a
                truncated SVD (U_i S_i V_i^T); vectors (norm scales, biases) kept dense
    router      a linear layer on the shared model's mean-pooled last hidden state,
                trained on the validation prompts of the experts' tasks to name the task
    per input   w = softmax(router(x)); theta(x) = theta* + sum_i w_i U_i S_i V_i^T

The output is a model-spec directory (not one checkpoint): `shared/` (a Hugging Face
checkpoint), `exclusive.safetensors`, `router.safetensors`, `twin.json` and
`model_spec.json`, which lm-eval loads through the model class `mergescale-twin`
(mergescale.evaluate.spec_models).

Evaluation never materialises theta(x). Forward hooks add each row's exclusive part to
the shared model's outputs: for a linear layer x (W* + sum_i w_i U_i S_i V_i^T)^T =
x W*^T + sum_i w_i ((x V_i) S_i) U_i^T, the same for embeddings, and modules with dense
parts (norms) are re-run per row with their row's parameters. So a batch of inputs with
different routing weights runs as one batch, exactly as if each had its own weights.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import Hyperparameter
from mergescale.rule_methods.registry import RuleJob, register_rule_method

log = logging.getLogger("mergescale.rule_methods.twin_merging")

SHARED_DIR = "shared"
EXCLUSIVE_FILE = "exclusive.safetensors"
ROUTER_FILE = "router.safetensors"
TWIN_FILE = "twin.json"
SPEC_MODEL = "mergescale-twin"
SPEC_MODULE = "mergescale.rule_methods.twin_merging_lm"  # registers SPEC_MODEL with lm-eval
PAPER = "https://arxiv.org/abs/2406.15479"
SHARED_METHODS = ("task_arithmetic", "ties")
DESCRIPTION = "Shared merge plus per-input router-weighted, SVD-compressed exclusive parts."


# -- hyperparameters -----------------------------------------------------------------

HYPERPARAMETERS = (
    Hyperparameter("rank", "int", 4, "Rank of each compressed exclusive matrix.", low=1),
    Hyperparameter("shared_method", "str", "ties", "Engine method that builds the shared model.",
                   choices=SHARED_METHODS),
    Hyperparameter("shared_params", "mapping", {"density": 0.2, "lambda": 1.0},
                   "Hyperparameters of shared_method (checked against its schema)."),
    Hyperparameter("router_steps", "int", 300, "Full-batch Adam steps of the router on the validation prompts.",
                   low=1),
    Hyperparameter("router_lr", "float", 0.05, "Router learning rate.", low=0.0, low_inclusive=False),
)


@dataclass(frozen=True)
class TwinParams:
    """The checked params (defaults: HYPERPARAMETERS, filled in by the registry)."""

    rank: int
    shared_method: str
    shared_params: dict
    router_steps: int
    router_lr: float


def check_shared_params(params: dict, where: str = "params") -> None:
    """shared_params against shared_method's schema; the registry calls it after the flat checks."""
    from mergescale.merge import validate_params

    try:
        validate_params(params["shared_method"], params["shared_params"])
    except MergeInputError as err:
        raise MergeInputError(f"{where}.shared_params: {err}") from None


# -- exclusive knowledge: truncated SVD per matrix --------------------------------------


def compress(delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Matrices -> {U, S, V} of the best rank-`rank` approximation; anything else stays dense."""
    delta = delta.float()
    if delta.ndim != 2:
        return {"dense": delta.clone()}
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, S.numel())
    return {"U": U[:, :r].contiguous(), "S": S[:r].contiguous(), "V": Vh[:r].T.contiguous()}


def reconstruct(part: dict[str, torch.Tensor]) -> torch.Tensor:
    if "dense" in part:
        return part["dense"]
    return (part["U"] * part["S"]) @ part["V"].T


def materialize(shared: dict[str, torch.Tensor], parts: list[dict[str, dict[str, torch.Tensor]]],
                weights: torch.Tensor | list[float]) -> dict[str, torch.Tensor]:
    """theta* + sum_i w_i * (expert i's compressed exclusive part), as a state dict."""
    return {name: shared[name].float() + sum(float(w) * reconstruct(p[name]) for w, p in zip(weights, parts))
            for name in shared}


def exclusive_parts(shared_dir: Path, experts: list[Path], rank: int
                    ) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per expert, per floating tensor: the compressed expert - shared; one tensor at a time."""
    from mergescale.merge.checkpoint import Checkpoint
    from mergescale.merge.validation import check_tensors

    checkpoints = [Checkpoint(shared_dir)] + [Checkpoint(e) for e in experts]
    try:
        names = check_tensors(checkpoints)
        parts: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in experts]
        for name in names:
            shared = checkpoints[0].read(name)
            if not shared.is_floating_point():
                continue
            for i, c in enumerate(checkpoints[1:]):
                parts[i][name] = compress(c.read(name).float() - shared.float(), rank)
        return parts
    finally:
        for c in checkpoints:
            c.close()


def save_parts(parts: list[dict[str, dict[str, torch.Tensor]]], path: Path) -> int:
    """One safetensors file, keys `<expert>/<tensor>/<U|S|V|dense>`; returns the bytes of tensors."""
    flat = {f"{i}/{name}/{kind}": t for i, p in enumerate(parts) for name, part in p.items()
            for kind, t in part.items()}
    save_file(flat, str(path))
    return sum(t.numel() * t.element_size() for t in flat.values())


def load_parts(path: Path, n_experts: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    parts: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(n_experts)]
    for key, t in load_file(str(path)).items():
        i, rest = key.split("/", 1)
        name, kind = rest.rsplit("/", 1)
        parts[int(i)].setdefault(name, {})[kind] = t
    return parts


# -- the router ---------------------------------------------------------------------------


@torch.no_grad()
def pooled_features(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding positions of the last hidden state."""
    hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def prompt_features(model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], add_special_tokens=False,
                        padding=True, return_tensors="pt")
        out.append(pooled_features(model, enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


class Router(torch.nn.Module):
    """softmax(W (f - mean) / std + b): task probabilities from pooled features."""

    def __init__(self, n_features: int, n_experts: int):
        super().__init__()
        self.linear = torch.nn.Linear(n_features, n_experts)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear((features - self.mean) / self.std), dim=-1)


def train_router(features: torch.Tensor, labels: torch.Tensor, n_experts: int, steps: int,
                 lr: float, seed: int) -> tuple[Router, float]:
    """Full-batch cross-entropy on (features, expert index); returns the router and its accuracy."""
    torch.manual_seed(seed)
    router = Router(features.shape[1], n_experts)
    router.mean.copy_(features.mean(0))
    router.std.copy_(features.std(0, correction=0).clamp(min=1e-6))
    opt = torch.optim.Adam(router.linear.parameters(), lr=lr)
    x = (features - router.mean) / router.std
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(router.linear(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((router(features).argmax(-1) == labels).float().mean())
    return router, accuracy


# -- per-input evaluation ------------------------------------------------------------------


class RoutedModel:
    """A Hugging Face model whose weights are theta* + sum_i w_i(row) Delta_i per batch row.

    Set `weights` (batch x experts) before a forward pass; None runs the shared model.
    """

    def __init__(self, model: torch.nn.Module, parts: list[dict[str, dict[str, torch.Tensor]]]):
        self.model = model
        self.weights: torch.Tensor | None = None
        self._bypass = False
        self._hooks = []
        owners = {}
        for module_name, module in model.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                if full in parts[0]:
                    owners.setdefault(module_name, (module, {}))[1][pname] = [p[full] for p in parts]
        missing = set(parts[0]) - {f"{m}.{p}" if m else p for m, (_, ps) in owners.items() for p in ps}
        if missing:
            raise ValueError(f"exclusive parts name tensors the model does not have: {sorted(missing)[:5]}")
        for module, by_param in owners.values():
            self._hooks.append(module.register_forward_hook(self._hook_for(module, by_param)))

    def _hook_for(self, module: torch.nn.Module, by_param: dict[str, list[dict]]) -> Callable:
        low_rank = all("U" in by_param[p][0] for p in by_param if p == "weight")
        if isinstance(module, torch.nn.Linear) and set(by_param) <= {"weight", "bias"} and low_rank:
            return self._linear_hook(by_param)
        if isinstance(module, torch.nn.Embedding) and set(by_param) == {"weight"} and low_rank:
            return self._embedding_hook(by_param["weight"])
        if any(True for _ in module.children()):  # its children would run unrouted per row
            raise NotImplementedError(f"{type(module).__name__} has parameters and submodules; "
                                      "per-row routing supports leaf modules only")
        return self._per_row_hook(module, by_param)

    @staticmethod
    def _stack(parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.stack([p["U"] for p in parts]), torch.stack([p["S"] for p in parts]),
                torch.stack([p["V"] for p in parts]))

    def _linear_hook(self, by_param: dict[str, list[dict]]) -> Callable:
        U, S, V = self._stack(by_param["weight"]) if "weight" in by_param else (None, None, None)
        bias = torch.stack([p["dense"] for p in by_param["bias"]]) if "bias" in by_param else None

        def hook(module, args, out):
            if self.weights is None or self._bypass:
                return None
            w = self.weights.to(out.dtype)  # (B, k)
            x = args[0]
            if U is not None:  # sum_i w_bi ((x V_i) * S_i) U_i^T
                xv = torch.einsum("b...n,knr->b...kr", x, V) * S
                out = out + torch.einsum("b...kr,kmr,bk->b...m", xv, U, w)
            if bias is not None:
                out = out + (w @ bias).view(w.shape[0], *([1] * (out.ndim - 2)), -1)
            return out

        return hook

    def _embedding_hook(self, parts: list[dict]) -> Callable:
        U, S, V = self._stack(parts)

        def hook(module, args, out):
            if self.weights is None or self._bypass:
                return None
            w = self.weights.to(out.dtype)
            rows = U[:, args[0]] * S.view(S.shape[0], *([1] * args[0].ndim), -1)  # (k, B, ..., r)
            return out + torch.einsum("kb...r,kdr,bk->b...d", rows, V, w)

        return hook

    def _per_row_hook(self, module: torch.nn.Module, by_param: dict[str, list[dict]]) -> Callable:
        deltas = {p: torch.stack([reconstruct(part) for part in parts]) for p, parts in by_param.items()}
        # Norm scales act elementwise: a (B, 1, ..., d) parameter then runs the whole batch in
        # one call. Whether it does is checked once against the row-by-row result.
        state = {"broadcast": None if all(d.ndim == 2 for d in deltas.values()) else False}

        def row_params(b):
            return {p: getattr(module, p) + torch.tensordot(self.weights[b].to(d.dtype), d, 1)
                    for p, d in deltas.items()}

        def per_row(args):
            row_args = [tuple(a[b:b + 1] if torch.is_tensor(a) else a for a in args)
                        for b in range(self.weights.shape[0])]
            return torch.cat([torch.func.functional_call(module, row_params(b), row_args[b])
                              for b in range(len(row_args))])

        def broadcast(args):
            lead = (self.weights.shape[0],) + (1,) * (args[0].ndim - 2)
            params = {p: getattr(module, p) + (self.weights.to(d.dtype) @ d).view(*lead, -1)
                      for p, d in deltas.items()}
            return torch.func.functional_call(module, params, args)

        def hook(module, args, out):
            if self.weights is None or self._bypass:
                return None
            self._bypass = True  # the calls below run this module again
            try:
                if state["broadcast"] is None:  # decide on a batch of several rows
                    rows = per_row(args)
                    if rows.shape[0] < 2:
                        return rows
                    try:
                        batched = broadcast(args)
                        state["broadcast"] = batched.shape == rows.shape and torch.allclose(
                            batched, rows, rtol=1e-5, atol=1e-6)
                    except RuntimeError:
                        state["broadcast"] = False
                    return rows
                return broadcast(args) if state["broadcast"] else per_row(args)
            finally:
                self._bypass = False

        return hook

    @contextmanager
    def routed(self, weights: torch.Tensor | None):
        old, self.weights = self.weights, weights
        try:
            yield
        finally:
            self.weights = old


@dataclass
class TwinModel:
    """A loaded Twin-Merging spec directory, ready to evaluate."""

    routed: RoutedModel
    tokenizer: Any
    router: Router
    tasks: list[str]

    @property
    def model(self):
        return self.routed.model

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Routing weights per row, from the shared model's features."""
        with self.routed.routed(None):
            return self.router(pooled_features(self.model, input_ids, mask).float())

    @contextmanager
    def per_input(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """Run the model inside this block with each row's own weights."""
        with self.routed.routed(self.route(input_ids, mask)):
            yield


def load_twin(spec_dir: Path, device: str = "cpu") -> TwinModel:
    from mergescale.models.llama import load_model

    spec_dir = Path(spec_dir)
    meta = json.loads((spec_dir / TWIN_FILE).read_text())
    model, tokenizer = load_model(spec_dir / SHARED_DIR)
    model.to(device).eval()
    parts = load_parts(spec_dir / EXCLUSIVE_FILE, len(meta["tasks"]))
    parts = [{n: {k: t.to(device) for k, t in p.items()} for n, p in e.items()} for e in parts]
    state = load_file(str(spec_dir / ROUTER_FILE))
    router = Router(state["linear.weight"].shape[1], len(meta["tasks"]))
    router.load_state_dict(state)
    return TwinModel(RoutedModel(model, parts), tokenizer, router.to(device).eval(), meta["tasks"])


# -- building a Twin-Merging directory -----------------------------------------------------


def _read_prompts(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def build_twin(*, base: Path, experts: list[Path], tasks: list[str], validation_files: list[Path],
               out_dir: Path, params: TwinParams, seed: int = 0, dtype: str = "float32",
               log_fn: Callable[[str], None] = print) -> dict:
    """Write a Twin-Merging model-spec directory to `out_dir`; returns its merge card.

    `tasks[i]` is expert i's task and `validation_files[i]` its validation split: the
    router learns to tell them apart.
    """
    from mergescale.merge import MergeRequest, run_merge
    from mergescale.merge.card import rule_method_output
    from mergescale.models.llama import load_model
    from mergescale.evaluate.spec_models import write_spec

    if not (len(experts) == len(tasks) == len(validation_files)):
        raise ValueError(f"{len(experts)} experts, {len(tasks)} tasks and {len(validation_files)} "
                         "validation files: one of each per expert")
    with rule_method_output(
        out_dir, method="twin_merging", paper=PAPER, params=asdict(params), base=base, experts=experts,
        description=DESCRIPTION,
        seed=seed, dtype=dtype, device="cpu",
    ) as (tmp, card):
        t0 = time.perf_counter()
        shared = run_merge(MergeRequest(method=params.shared_method, base=base, experts=experts,
                                        out_dir=tmp / SHARED_DIR, params=dict(params.shared_params),
                                        dtype=dtype, seed=seed))
        log_fn(f"shared model ({params.shared_method}) in {time.perf_counter() - t0:.1f}s")

        t0 = time.perf_counter()
        parts = exclusive_parts(tmp / SHARED_DIR, experts, params.rank)
        exclusive_bytes = save_parts(parts, tmp / EXCLUSIVE_FILE)
        dense_bytes = sum(4 * (p["dense"].numel() if "dense" in p else p["U"].shape[0] * p["V"].shape[0])
                          for e in parts for p in e.values())
        log_fn(f"exclusive parts at rank {params.rank}: {exclusive_bytes:,} B "
               f"({exclusive_bytes / dense_bytes:.1%} of dense) in {time.perf_counter() - t0:.1f}s")

        t0 = time.perf_counter()
        model, tokenizer = load_model(tmp / SHARED_DIR)
        model.eval()
        prompts = [_read_prompts(Path(f)) for f in validation_files]
        for task, f, p in zip(tasks, validation_files, prompts):
            if not p:
                raise ValueError(f"{f}: no validation prompts for task {task!r}")
        features = prompt_features(model, tokenizer, [x for p in prompts for x in p])
        labels = torch.tensor([i for i, p in enumerate(prompts) for _ in p])
        router, accuracy = train_router(features, labels, len(experts), params.router_steps,
                                        params.router_lr, seed)
        save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(tmp / ROUTER_FILE))
        router_bytes = sum(v.numel() * v.element_size() for v in router.state_dict().values())
        log_fn(f"router: {len(labels)} validation prompts, training accuracy {accuracy:.3f} "
               f"in {time.perf_counter() - t0:.1f}s")

        (tmp / TWIN_FILE).write_text(json.dumps(
            {"tasks": list(tasks), "rank": params.rank, "shared_method": params.shared_method}, indent=2) + "\n")
        write_spec(tmp, SPEC_MODEL, module=SPEC_MODULE)
        card.update({
            "tasks": list(tasks),
            "router_train_accuracy": round(accuracy, 4),
            "n_parameters": shared.card["n_parameters"],
            # What Twin-Merging stores beyond one model, against keeping every expert's delta.
            "storage_bytes": {"shared": shared.card["output_bytes"], "exclusive": exclusive_bytes,
                              "router": router_bytes, "exclusive_dense": dense_bytes},
        })
    return card


@register_rule_method(
    name="twin_merging",
    hyperparameters=HYPERPARAMETERS,
    paper=PAPER,
    description=DESCRIPTION,
    needs=("validation_data",),
    output="model_spec",
    check=check_shared_params,
)
def run(job: RuleJob) -> dict:
    card = build_twin(base=job.base, experts=job.experts, tasks=job.tasks,
                      validation_files=job.data["validation_data"], out_dir=job.out_dir,
                      params=TwinParams(**job.params), seed=job.seed, dtype=job.dtype, log_fn=job.log)
    job.log(f"done in {card['wall_time_s']:.2f}s, peak RSS {card['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"storage {card['storage_bytes']}")
    return card
