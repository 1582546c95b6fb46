import pytest
import torch

from mergescale.models.llama import TinyShape, count_parameters, load_model, new_llama
from mergescale.training.stages import finetune, pretrain_base
from mergescale.tasks import ALPHABET, make_splits, write_jsonl
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.training.loop import IGNORE_INDEX, TrainConfig, collate, encode, lr_at

TOK = build_char_tokenizer(ALPHABET)
SHAPE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def test_answer_only_labels_hide_the_prompt():
    rows = [{"prompt": "first abc=", "answer": "a"}]
    (ids, labels), = encode(TOK, rows, "answer")
    assert TOK.decode(ids) == "first abc=a\n"
    assert labels[:10] == [IGNORE_INDEX] * 10 and labels[10:] == ids[10:]
    (_, all_labels), = encode(TOK, rows, "all")
    assert all_labels == ids


def test_collate_pads_right_and_masks():
    batch = encode(TOK, [{"prompt": "x=", "answer": "1"}, {"prompt": "long=", "answer": "22"}], "all")
    out = collate(batch, TOK.pad_token_id)
    assert out["input_ids"].shape == (2, 8)
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (out["labels"][0, 4:] == IGNORE_INDEX).all()


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="loss_on"):
        TrainConfig(steps=1, loss_on="prompt")


def test_pretrain_then_finetune_learns_and_is_deterministic(tmp_path):
    data = {}
    for task in ("first_letter", "parity_number"):
        path = tmp_path / "data" / f"{task}.jsonl"
        write_jsonl(make_splits(task, {"train": 300, "validation": 10, "test": 10})["train"], path)
        data[task] = path
    torch.set_num_threads(1)
    cards = [pretrain_base(SHAPE, {"steps": 20, "batch_size": 16}, data, tmp_path / f"base{i}", log=lambda m: None)
             for i in range(2)]
    assert cards[0]["loss_history"] == cards[1]["loss_history"]  # same seed, same run
    assert (tmp_path / "base0" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".base0*"))  # no temporary directory left behind
    card = finetune(tmp_path / "base0", {"steps": 60, "batch_size": 32, "lr": 5e-3},
                    {"first_letter": data["first_letter"]}, tmp_path / "expert", stage="finetune_expert",
                    log=lambda m: None)
    assert card["loss_history"][-1]["loss"] < card["loss_history"][0]["loss"]
    model, tok = load_model(tmp_path / "expert")
    assert count_parameters(model) == count_parameters(new_llama(TinyShape(**SHAPE), TOK, 0))


def test_training_cards_list_their_families_and_keep_benchmarks_out(tmp_path):
    """Pretraining and instruction tuning read only their own families: the cards say
    which, and none is a held-in or held-out (benchmark) family."""
    from mergescale.sources.grid import instruct_tasks, pretrain_tasks
    from mergescale.tasks.families import families_with_role

    def files(tasks):
        out = {}
        for task in tasks:
            out[task] = tmp_path / "data" / f"{task}.jsonl"
            write_jsonl(make_splits(task, {"train": 50, "validation": 5, "test": 5})["train"], out[task])
        return out

    torch.set_num_threads(1)
    base = pretrain_base(SHAPE, {"steps": 2, "batch_size": 8}, files(pretrain_tasks()),
                         tmp_path / "base", log=lambda m: None)
    it = finetune(tmp_path / "base", {"steps": 2, "batch_size": 8}, files(instruct_tasks()),
                  tmp_path / "it", stage="instruct_base", log=lambda m: None)
    benchmark = set(families_with_role("task"))
    assert base["tasks"] == pretrain_tasks() and it["tasks"] == instruct_tasks()
    assert not (set(base["tasks"]) | set(it["tasks"])) & benchmark


def test_replay_share_of_each_batch_comes_from_the_replay_mixture(tmp_path):
    """An expert with replay sees its task in (1 - replay) of each batch and the
    pretraining mixture in the rest; its card lists both, and no benchmark family is
    among the replayed ones."""
    from mergescale.sources.grid import pretrain_tasks
    from mergescale.tasks.families import families_with_role
    from mergescale.training.loop import train

    tok = TOK
    model = new_llama(TinyShape(**SHAPE), tok, 0)
    rows = {"first_letter": make_splits("first_letter", {"train": 40, "validation": 1, "test": 1})["train"]}
    replay = {t: make_splits(t, {"train": 40, "validation": 1, "test": 1})["train"] for t in ("text", "third_letter")}
    seen = []
    orig = collate

    import mergescale.training.loop as train_mod

    def spy(batch, pad_id):
        seen.append([tok.decode(ids) for ids, _ in batch])
        return orig(batch, pad_id)

    train_mod.collate, saved = spy, train_mod.collate
    try:
        torch.set_num_threads(1)
        summary = train(model, tok, rows, TrainConfig(steps=3, batch_size=8, replay=0.25),
                        log=lambda m: None, replay_by_task=replay)
    finally:
        train_mod.collate = saved
    assert summary["replay_tasks"] == ["text", "third_letter"]
    for batch in seen:
        assert sum(text.startswith("first ") for text in batch) == 6  # 8 - round(0.25 * 8)
    with pytest.raises(ValueError, match="replay mixture"):
        train(model, tok, rows, TrainConfig(steps=1, batch_size=8, replay=0.5), log=lambda m: None)
    with pytest.raises(ValueError, match="replay"):
        TrainConfig(steps=1, replay=1.0)

    def files(tasks):
        out = {}
        for task in tasks:
            out[task] = tmp_path / "data" / f"{task}.jsonl"
            write_jsonl(make_splits(task, {"train": 30, "validation": 2, "test": 2})["train"], out[task])
        return out

    pretrain_base(SHAPE, {"steps": 2, "batch_size": 8}, files(["text"]), tmp_path / "base", log=lambda m: None)
    card = finetune(tmp_path / "base", {"steps": 2, "batch_size": 8, "replay": 0.5}, files(["first_letter"]),
                    tmp_path / "expert", stage="finetune_expert", log=lambda m: None,
                    replay_files=files(pretrain_tasks()))
    assert card["tasks"] == ["first_letter"] and card["replay_tasks"] == pretrain_tasks()
    assert card["config"]["replay"] == 0.5
    assert not set(card["replay_tasks"]) & set(families_with_role("task"))
