"""The merge card: what was merged, how, with what, and what it cost.

`merge_card.json` is for machines (the workflow reads runtime and memory from it);
README.md is the same facts for people.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

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
        f"- Tensors: {card['n_tensors']} ({card['n_parameters']:,} parameters) in {len(card['shards'])} shard(s)",
        f"- Wall time: {card['wall_time_s']:.2f} s; peak RSS: {card['peak_rss_bytes'] / 2**20:.0f} MiB",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()),
        "",
        f"Written by mergescale; full record in `{CARD_NAME}`.",
        "",
    ]
    return "\n".join(lines)
