import random

import pytest
import yaml

from mergescale.tasks import FAMILIES, get_family, make_splits, read_jsonl, write_jsonl
from mergescale.tasks.lmeval_yaml import lm_eval_task_name, write_task_yaml
from mergescale.tokenizer import build_char_tokenizer
from mergescale.tasks import ALPHABET

SIZES = {"train": 300, "validation": 50, "test": 50}


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_splits_are_deterministic_and_disjoint(task):
    a = make_splits(task, SIZES, seed=3)
    b = make_splits(task, SIZES, seed=3)
    assert a == b
    prompts = {s: {r["prompt"] for r in rows} for s, rows in a.items()}
    assert all(len(prompts[s]) == SIZES[s] for s in SIZES)  # unique within a split
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert make_splits(task, SIZES, seed=4) != a


def test_evaluation_splits_do_not_depend_on_train_size():
    small = make_splits("first_letter", {"train": 10, "validation": 20, "test": 20})
    large = make_splits("first_letter", {"train": 500, "validation": 20, "test": 20})
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


@pytest.mark.parametrize(
    "task, x, answer",
    [
        ("first_letter", "hello", "h"), ("last_letter", "hello", "o"),
        ("second_letter", "hello", "e"), ("reverse_word", "abc", "cba"),
        ("max_digit", "31415", "5"), ("min_digit", "31415", "1"),
        ("parity", "1234", "even"), ("parity", "1237", "odd"),
        ("word_length", "abcdefg", "7"), ("next_letter", "fuzz", "a"),
        ("prev_letter", "apple", "z"), ("larger_number", "47,82", "82"),
        ("smaller_number", "47,82", "47"),
    ],
)
def test_answers_are_correct(task, x, answer):
    family = get_family(task)
    assert family.solve(x) == answer
    assert family.prompt(x).endswith("=")


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_examples_fit_the_tokenizer_and_answer_their_prompt(task):
    tok = build_char_tokenizer(ALPHABET)
    family = get_family(task)
    rng = random.Random(0)
    for _ in range(200):
        ex = family.example(rng)
        text = ex["prompt"] + ex["answer"] + "\n"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        x = ex["prompt"][len(family.instruction) + 1 : -1]
        assert family.solve(x) == ex["answer"]


def test_unknown_task_names_close_matches():
    with pytest.raises(KeyError, match="first_letter"):
        get_family("first_leter")


def test_jsonl_round_trip_and_bad_line(tmp_path):
    rows = make_splits("parity", SIZES)["test"]
    write_jsonl(rows, tmp_path / "t.jsonl")
    assert read_jsonl(tmp_path / "t.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_rendered_yaml_is_a_loadable_lm_eval_task(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    rows = make_splits("max_digit", SIZES)["test"]
    write_jsonl(rows, tmp_path / "data" / "test.jsonl")
    write_task_yaml("max_digit", "test", "data/test.jsonl", tmp_path / "tasks" / "max_digit_test.yaml")
    spec = yaml.safe_load((tmp_path / "tasks" / "max_digit_test.yaml").read_text())
    assert spec["generation_kwargs"]["until"] == ["\n"]  # the newline survives serialisation
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    name = lm_eval_task_name("max_digit", "test")
    assert name in manager.all_tasks
    task = manager.load([name])["tasks"][name]
    docs = list(task.test_docs())
    assert len(docs) == len(rows) and docs[0]["answer"] == rows[0]["answer"]
    assert task.doc_to_text(docs[0]) == rows[0]["prompt"]
