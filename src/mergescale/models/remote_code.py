"""Model files never run code: refuse checkpoints that need `trust_remote_code`.

A config.json (or tokenizer_config.json) whose `auto_map` points at Python files inside
the checkpoint asks transformers to import them, i.e. to run whatever they contain.
Every loader in mergescale passes ``trust_remote_code=False``; this check runs first so
that such a checkpoint fails with one message naming the file, instead of transformers'
generic refusal (or, when stdin is a terminal, its "run the custom code? [y/N]" prompt).
The merge engine reads config.json as plain JSON and never imports anything.
"""

from __future__ import annotations

import json
from pathlib import Path


class RemoteCodeRefused(ValueError):
    """The checkpoint can only be loaded by running Python code shipped with it."""


def _auto_map(path: Path) -> tuple[dict, dict]:
    """(the JSON file as a dict, its auto_map) or ({}, {}) when absent."""
    if not path.is_file():
        return {}, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RemoteCodeRefused(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("auto_map"), dict):
        return {}, {}
    return data, data["auto_map"]


def _refuse(path: Path, what: str, auto_map: dict) -> RemoteCodeRefused:
    targets = sorted({str(v[0] if isinstance(v, list) else v) for v in auto_map.values()})
    return RemoteCodeRefused(
        f"{path}: {what} is not implemented by transformers and auto_map points at code "
        f"shipped with the checkpoint ({', '.join(targets)}); mergescale never runs code "
        "from model files (trust_remote_code stays off): use a checkpoint whose model and "
        "tokenizer classes transformers implements"
    )


def check_no_remote_code(model_dir: Path | str) -> None:
    """Raise RemoteCodeRefused if loading `model_dir` would need code from the checkpoint.

    An `auto_map` next to a model_type (tokenizer_class) that transformers implements is
    harmless: with trust_remote_code off, transformers uses its own class and ignores it.
    """
    model_dir = Path(model_dir)
    config, auto_map = _auto_map(model_dir / "config.json")
    if auto_map:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise _refuse(model_dir / "config.json", f"model_type {config.get('model_type')!r}", auto_map)
    tok_config, auto_map = _auto_map(model_dir / "tokenizer_config.json")
    if auto_map.get("AutoTokenizer"):
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        name = tok_config.get("tokenizer_class")
        # (without a tokenizer_class transformers picks one from model_type, or refuses)
        if isinstance(name, str) and tokenizer_class_from_name(name) is None:
            raise _refuse(model_dir / "tokenizer_config.json", f"tokenizer_class {name!r}", auto_map)
