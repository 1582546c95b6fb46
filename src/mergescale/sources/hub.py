"""Bring a model from the Hugging Face hub (or a local directory) into the results tree.

A model is named by ``{"repo": ..., "revision": ...}`` (hub) or ``{"path": ...}`` (local).
Only safetensors weights, configs and tokenizer files are fetched; pickle weights are
never downloaded or copied, and a repository that has nothing else is refused. Every
file is checked before the output directory appears (written atomically): each
safetensors header parses and its size matches the file, the shard index names only
shards that are present and tensors they hold, config.json loads.

Hub downloads go through ``huggingface_hub.snapshot_download`` into the standard cache
(``HF_HUB_CACHE``, else ``$HF_HOME/hub``, read when the download runs), then are
hard-linked (copied across file systems) into the output. ``HF_HUB_OFFLINE=1`` uses the
cache only. A revision is required; only a commit hash pins the files, a branch or tag
name moves when the repository is updated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from mergescale.io_utils import atomic_directory, atomic_write_json
from mergescale.merge.errors import MergeInputError
from mergescale.merge.safetensors_io import read_header

# What a causal LM needs to be loaded and scored; top-level names in the repository.
ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
INDEX = "model.safetensors.index.json"
ADAPTER = "adapter_model.safetensors"
SOURCE_CARD = "source.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelSourceError(ValueError):
    """A model cannot be fetched or fails verification; the message names repo and file."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache, from the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def describe(spec: dict) -> str:
    if "repo" in spec:
        return f"{spec['repo']}@{spec.get('revision')}"
    return str(spec.get("path"))


def selected_files(names: list[str]) -> list[str]:
    """The top-level files of a repository that ALLOW_PATTERNS fetches."""
    from huggingface_hub.utils import filter_repo_objects

    top = [n for n in names if "/" not in n]
    return sorted(filter_repo_objects(top, allow_patterns=ALLOW_PATTERNS))


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def download_snapshot(repo: str, revision: str, log=print) -> tuple[Path, str]:
    """Fetch the allowed files of ``repo`` at ``revision`` into the hub cache.

    Returns (snapshot directory, commit hash)."""
    from huggingface_hub import snapshot_download

    if not revision:
        raise ModelSourceError(f"{repo}: a revision is required (a commit hash pins the files)")
    if not _COMMIT.fullmatch(revision):
        log(f"warning: {repo}: revision {revision!r} is a branch or tag, not a commit hash; "
            "the files may change when the repository is updated")
    offline = hub_offline()
    try:
        snapshot = snapshot_download(
            repo, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except Exception as err:  # hub errors come in many types; say which model and why
        where = f"offline, cache {hub_cache_dir()}" if offline else "online"
        raise ModelSourceError(f"{repo}@{revision}: download failed ({where}): "
                               f"{type(err).__name__}: {err}") from err
    snapshot = Path(snapshot)
    return snapshot, snapshot.name


def _repo_files(repo: str, revision: str, snapshot: Path) -> list[str]:
    """Every file of the repository (to name what was refused); the cached snapshot offline."""
    if not hub_offline():
        try:
            from huggingface_hub import HfApi

            return sorted(HfApi().list_repo_files(repo, revision=revision))
        except Exception:  # listing is only for the error message
            pass
    return _listing(snapshot)


def weight_files(files: list[str], all_files: list[str], what: str) -> list[str]:
    """The safetensors weights among ``files``; refuses pickle-only and adapter-only models
    (``all_files``: every file of the model, to name the refused ones)."""
    weights = [f for f in files if f.endswith(".safetensors") and f != ADAPTER]
    if weights:
        return weights
    pickles = [f for f in all_files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ModelSourceError(
            f"{what}: no safetensors weights, only pickle weights ({', '.join(pickles)}); "
            "pickle files can run code when loaded and are refused: use a safetensors revision")
    if ADAPTER in files:
        raise ModelSourceError(f"{what}: holds only a PEFT adapter ({ADAPTER}); merge it into "
                               "its base model first")
    raise ModelSourceError(f"{what}: no model weights (*.safetensors) found")


def _check_safetensors(path: Path, what: str) -> dict:
    try:
        infos, _ = read_header(path)
    except MergeInputError as err:
        raise ModelSourceError(f"{what}: {err}") from None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    data_end = max((i.begin + i.nbytes for i in infos.values()), default=8 + header_len)
    if data_end != size:
        raise ModelSourceError(
            f"{what}: {path.name}: size mismatch: its header describes {data_end} bytes, "
            f"the file has {size}")
    return infos


def verify_model_dir(root: Path, files: list[str], all_files: list[str], what: str) -> None:
    """Check the model files ``files`` (names relative to ``root``; ``all_files`` is everything
    the model has) and raise ModelSourceError naming the model and file."""
    if "config.json" not in files:
        raise ModelSourceError(f"{what}: no config.json")
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"{what}: config.json does not load ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelSourceError(f"{what}: config.json has no 'model_type'")
    weights = weight_files(files, all_files, what)
    if not any(t in files for t in TOKENIZER_FILES):
        raise ModelSourceError(f"{what}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    headers = {w: _check_safetensors(root / w, what) for w in weights}
    if INDEX in files:
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelSourceError(f"{what}: {INDEX} has no readable weight_map ({err})") from None
        for tensor, shard in weight_map.items():
            if shard not in headers:
                raise ModelSourceError(f"{what}: {INDEX} lists shard {shard} (tensor {tensor!r}), "
                                       "which is not in the model")
            if tensor not in headers[shard]:
                raise ModelSourceError(f"{what}: {INDEX} puts tensor {tensor!r} in {shard}, "
                                       "whose header does not have it")


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no disk; across file systems (or where links are refused) copy.
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def fetch_model(spec: dict, out_dir: Path, log=print) -> dict:
    """Fetch, verify and install the model ``spec`` as ``out_dir``; returns its source card."""
    what = describe(spec)
    if "repo" in spec:
        if not spec.get("revision"):
            raise ModelSourceError(f"{spec['repo']}: a revision is required (a commit hash pins the files)")
        root, commit = download_snapshot(spec["repo"], spec["revision"], log=log)
        card = {"source": "hub", "repo": spec["repo"], "revision": spec["revision"], "commit": commit}
        all_files = _listing(root)
        if not any(f.endswith(".safetensors") for f in all_files):
            # Name what is refused from the repository's listing, not only the cache.
            all_files = _repo_files(spec["repo"], spec["revision"], root)
    elif "path" in spec:
        root = Path(spec["path"]).expanduser()
        if not root.is_dir():
            raise ModelSourceError(f"{what}: not a directory")
        card = {"source": "local", "path": str(root.resolve())}
        all_files = _listing(root)
    else:
        raise ModelSourceError(f"model source {spec!r}: give repo and revision, or path")
    files = selected_files(all_files)
    verify_model_dir(root, files, all_files, what)
    card["files"] = {f: (root / f).stat().st_size for f in files}
    log(f"{what}: {len(files)} files verified, {sum(card['files'].values()) / 2**20:.1f} MiB")
    with atomic_directory(out_dir) as tmp:
        for f in files:
            _link_or_copy(root / f, tmp / f)
        atomic_write_json(tmp / SOURCE_CARD, card)
    return card
