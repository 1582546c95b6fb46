"""Statistics for data-aware merging, computed once per (base, expert) and shared.

One pass over N examples of the expert's own task (prompt + answer, as in training):

    fisher.safetensors  diagonal empirical Fisher: mean over examples of the squared
                        gradient of log p(answer tokens | prompt), one tensor per parameter
                        (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832)
    gram.safetensors    X^T X of every nn.Linear's input over all non-padding tokens,
                        stored under the linear's weight name ([in, in] for an [out, in]
                        weight), plus the token count under TOKENS_KEY
                        (Jin et al. 2023, RegMean, https://arxiv.org/abs/2212.09849)
    stats_card.json     examples used, seconds, peak memory

`StatsReader` hands these to the merge engine one tensor at a time (safetensors is read
lazily), so no method loads a whole statistics file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergescale.merge.errors import MergeInputError

FISHER_FILE = "fisher.safetensors"
GRAM_FILE = "gram.safetensors"
STATS_CARD = "stats_card.json"
TOKENS_KEY = "__tokens__"
KIND_FILES = {"fisher": FISHER_FILE, "gram": GRAM_FILE}


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear of `model` by the name of its weight tensor."""
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


class GramCollector:
    """Forward hooks that add X^T X of each hooked linear's input (padding excluded).

    Set `mask` ([batch, seq], 1 = real token) before each forward with padding; None
    counts every position. Shared by the statistics pass and RegMean++.
    """

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().to(torch.float32)
            x = x.reshape(-1, x.shape[-1]) if self.mask is None else x[self.mask.bool()]
            g = x.T @ x  # [in, in]
            if name in self.grams:
                self.grams[name] += g
            else:
                self.grams[name] = g
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def encode_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (answer tokens only), exactly as fine-tuning encodes them."""
    from mergescale.training.loop import encode

    return encode(tokenizer, rows, loss_on="answer")


def _answer_log_likelihood(model, ids: list[int], labels: list[int], device) -> torch.Tensor:
    input_ids = torch.tensor([ids], device=device)
    target = torch.tensor([labels[1:]], device=device)
    logits = model(input_ids=input_ids).logits[:, :-1]
    return -torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="sum"
    )


def compute_statistics(model, tokenizer, rows: list[dict], device: str | torch.device = "cpu",
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(fisher, grams, tokens) of `model` on `rows`; one example at a time.

    The empirical Fisher needs one gradient per example (squaring a batch gradient
    would mix examples); the Gram matrices come from the same forward passes.
    """
    device = torch.device(device)
    model.to(device).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    collector = GramCollector(linear_modules(model))
    tokens = 0
    try:
        for ids, labels in encode_examples(tokenizer, rows):
            model.zero_grad(set_to_none=True)
            _answer_log_likelihood(model, ids, labels, device).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].add_(p.grad.float().square())
            tokens += len(ids)
    finally:
        collector.remove()
        model.zero_grad(set_to_none=True)
    for f in fisher.values():
        f.div_(max(1, len(rows)))
    return fisher, collector.grams, tokens


def save_statistics(out_dir: Path, fisher: dict, grams: dict, tokens: int, card: dict) -> None:
    """Write the three files into `out_dir` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    from mergescale.io_utils import atomic_write_json

    out_dir = Path(out_dir)
    save_file({n: t.contiguous().cpu() for n, t in fisher.items()}, str(out_dir / FISHER_FILE))
    gram_tensors = {n: t.contiguous().cpu() for n, t in grams.items()}
    gram_tensors[TOKENS_KEY] = torch.tensor([tokens], dtype=torch.int64)
    save_file(gram_tensors, str(out_dir / GRAM_FILE))
    atomic_write_json(out_dir / STATS_CARD, card)


def take_examples(rows: list[dict], examples: int, source: Path | str) -> list[dict]:
    """The first `examples` rows (splits are already shuffled when generated)."""
    if not rows:
        raise MergeInputError(f"{source}: no examples to compute statistics on")
    return rows[:examples]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_and_save(model_dir: Path, data_file: Path, out_dir: Path, examples: int,
                     device: str | None = None, log=print) -> dict:
    """The `compute_stats` rule: statistics of one expert on its own task's data."""
    from mergescale.io_utils import atomic_directory
    from mergescale.merge.card import peak_rss_bytes
    from mergescale.models.llama import load_model
    from mergescale.tasks import read_jsonl

    start = time.perf_counter()
    device = device or default_device()
    rows = take_examples(read_jsonl(data_file), examples, data_file)
    model, tokenizer = load_model(model_dir)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fisher, grams, tokens = compute_statistics(model, tokenizer, rows, device)
    card = {
        "model": str(model_dir), "data": str(data_file), "examples": len(rows), "tokens": tokens,
        "device": device, "n_fisher_tensors": len(fisher), "n_gram_tensors": len(grams),
        "seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }
    with atomic_directory(out_dir) as tmp:
        save_statistics(tmp, fisher, grams, tokens, card)
    log(f"statistics of {model_dir} on {len(rows)} examples ({tokens} tokens) in {card['seconds']:.1f}s")
    return card


@dataclass
class _Opened:
    path: Path
    handle: object


class StatsReader:
    """Per-expert statistics for one tensor at a time, read lazily from safetensors.

    kinds: what the method reads ("fisher", "gram"); dirs: one statistics directory per
    expert. get(name) -> one {kind: tensor or None} per expert; None means the kind has
    no entry for that tensor (a Gram exists only for linear weights).
    """

    def __init__(self, kinds: tuple[str, ...], dirs: list[Path]):
        # Read with positional reads, not a memory map: mapped pages stay resident
        # while the file is open, so a merge's memory would grow with every Gram read.
        import os

        from mergescale.merge.safetensors_io import read_header

        self.kinds = kinds
        self.dirs = [Path(d) for d in dirs]
        self._files: list[dict[str, _Opened]] = []
        for d in self.dirs:
            opened = {}
            for kind in kinds:
                path = d / KIND_FILES[kind]
                if not path.is_file():
                    raise MergeInputError(f"{path}: statistics file missing (run the compute_stats rule)")
                infos, _ = read_header(path)  # names the file when it is corrupt
                opened[kind] = _Opened(path, (os.open(path, os.O_RDONLY), infos))
            self._files.append(opened)

    def get(self, name: str, shape: torch.Size) -> list[dict[str, torch.Tensor | None]]:
        from mergescale.merge.safetensors_io import read_tensor

        out = []
        for opened in self._files:
            entry: dict[str, torch.Tensor | None] = {}
            for kind, f in opened.items():
                fd, infos = f.handle
                if name not in infos:
                    if kind == "fisher":
                        raise MergeInputError(f"{f.path}: no Fisher diagonal for tensor {name!r}")
                    entry[kind] = None
                    continue
                t = read_tensor(fd, infos[name], f.path)
                want = tuple(shape) if kind == "fisher" else (shape[-1], shape[-1])
                if tuple(t.shape) != want:
                    raise MergeInputError(
                        f"{f.path}: {kind} of tensor {name!r} has shape {list(t.shape)}, expected {list(want)}"
                    )
                if not bool(torch.isfinite(t).all()):
                    raise MergeInputError(f"{f.path}: {kind} of tensor {name!r} contains NaN/Inf")
                entry[kind] = t
            out.append(entry)
        return out

    def close(self) -> None:
        import os

        for opened in self._files:
            for f in opened.values():
                os.close(f.handle[0])
        self._files = []

    def cards(self) -> list[dict]:
        import json

        cards = []
        for d in self.dirs:
            p = d / STATS_CARD
            cards.append(json.loads(p.read_text()) if p.is_file() else {})
        return cards
