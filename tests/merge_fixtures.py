"""Tiny random Llama checkpoints for merge tests (hidden 32, 2 layers)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(
    path: Path,
    seed: int,
    *,
    like: Path | None = None,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "20KB",
    config=None,
) -> Path:
    """Save a random tiny Llama; with `like`, the weights of `like` plus Gaussian noise.

    The small max_shard_size makes transformers write several shards and an index.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if like is not None:
        model = AutoModelForCausalLM.from_pretrained(like, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    else:
        model = LlamaForCausalLM(config or tiny_llama_config())
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    (Path(path) / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return Path(path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def save_word_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer with exactly `vocab_size` tokens (tokens "w0", "w1", ...)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def run_mergekit(venv: str | Path, jobs: list[tuple[str, Path, Path]], log_dir: Path, parallel: int = 2) -> dict:
    """Run `mergekit-yaml config out` for each (name, config, out), `parallel` at a time;
    returns name -> (config, out, return code, log file)."""
    import subprocess

    exe = Path(venv) / "bin" / "mergekit-yaml"
    results, running = {}, []
    for job in list(jobs) + [None] * parallel:
        if job is not None:
            name, config, out = job
            log = open(log_dir / f"{name}.log", "w")
            cmd = [str(exe), str(config), str(out), "--no-copy-tokenizer", "--quiet", "--num-threads", "1"]
            running.append((name, config, out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        while running and (len(running) >= parallel or job is None):
            name, config, out, proc, log = running.pop(0)
            proc.wait()
            log.close()
            results[name] = (config, out, proc.returncode, log_dir / f"{name}.log")
    return results
