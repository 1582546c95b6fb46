"""The merge card: what was merged, how, with what, and what it cost.

`merge_card.json` is for machines (the workflow reads runtime and memory from it);
README.md is the same facts for people.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

CARD_NAME = "merge_card.json"


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "mergescale"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def describe(*, method: str, description: str, paper: str, params: dict[str, Any],
             base: Path | None, experts: list[Path], expert_params: list[dict] | None = None,
             seed: int, dtype: str, device: str) -> dict[str, Any]:
    """The card's record of what was merged and how (shared by the engine and rule-methods)."""
    expert_params = expert_params or [{} for _ in experts]
    return {
        "method": method,
        "description": description,
        "paper": paper,
        "params": params,
        "base": {"path": str(Path(base).resolve())} if base is not None else None,
        "experts": [{"path": str(Path(p).resolve()), "params": ep} for p, ep in zip(experts, expert_params)],
        "seed": seed,
        "dtype": dtype,
        "device": device,
    }


def cost(start: float) -> dict[str, Any]:
    """The card's record of what the merge cost, measured from `start` (time.perf_counter())."""
    return {
        "versions": library_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }


@contextmanager
def rule_method_output(out_dir: Path | str, **what: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Write a rule-method's output directory atomically, with its merge card.

    Yields (a temporary directory to fill, the card); add method-specific facts to the
    card (e.g. `storage_bytes`). On success the card gets the wall time and peak memory
    since entering, is written, and the directory is renamed to `out_dir`; on error
    nothing is left. `what` takes the keyword arguments of `describe`.
    """
    from mergescale.io_utils import atomic_directory

    start = time.perf_counter()
    card = describe(**what)
    with atomic_directory(Path(out_dir)) as tmp:
        yield tmp, card
        card.update(cost(start))
        write_card(tmp, card)


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    with open(out_dir / CARD_NAME, "w") as f:
        json.dump(card, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    (out_dir / "README.md").write_text(render_readme(card))


def render_readme(card: dict[str, Any]) -> str:
    lines = [
        f"# Merged model: {card['method']}",
        "",
        f"{card['description']}",
        "",
        f"- Paper: {card['paper']}",
        f"- Base model: `{card['base']['path']}`" if card["base"] else "- Base model: none",
        "- Experts:",
    ]
    for expert in card["experts"]:
        params = ", ".join(f"{k}={v}" for k, v in expert["params"].items()) or "defaults"
        lines.append(f"  - `{expert['path']}` ({params})")
    globals_ = ", ".join(f"{k}={v}" for k, v in card["params"].items()) or "none"
    lines += [
        f"- Hyperparameters: {globals_}",
        f"- Seed: {card['seed']}; output dtype: {card['dtype']}; device: {card['device']}",
    ]
    if "shards" in card:  # rule-methods may write other outputs than one checkpoint
        lines.append(f"- Tensors: {card['n_tensors']} ({card['n_parameters']:,} parameters) "
                     f"in {len(card['shards'])} shard(s)")
    if "storage_bytes" in card:
        lines.append("- Storage: " + ", ".join(f"{k} {v:,} B" for k, v in card["storage_bytes"].items()))
    lines += [
        f"- Wall time: {card['wall_time_s']:.2f} s; peak RSS: {card['peak_rss_bytes'] / 2**20:.0f} MiB",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()),
        "",
        f"Written by mergescale; full record in `{CARD_NAME}`.",
        "",
    ]
    return "\n".join(lines)
