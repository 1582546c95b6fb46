"""Model shapes, creation, loading and saving (Hugging Face format, safetensors only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mergescale.models.remote_code import check_no_remote_code


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int

    def llama_config(self, vocab_size: int, tokenizer) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=64,  # prompts and answers stay under ~30 characters
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,  # every tensor merges on its own
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def new_llama(shape: TinyShape, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.llama_config(len(tokenizer), tokenizer))


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    """Load a local checkpoint; weights must be safetensors (no pickle), and code shipped
    with the checkpoint is never run (see mergescale.models.remote_code)."""
    path = Path(path)
    check_no_remote_code(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


def save_model(model, tokenizer, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
