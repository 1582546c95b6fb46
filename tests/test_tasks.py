import random
import re

import pytest
import yaml

from mergescale.tasks import FAMILIES, get_family, make_splits, read_jsonl, write_jsonl
from mergescale.tasks.splits import example_key
from mergescale.tasks.lmeval_yaml import lm_eval_task_name, write_task_yaml
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.tasks import ALPHABET
from mergescale.tasks.families import PRETRAIN_SUFFIX, ROLES, TEXT, families_with_role

SIZES = {"train": 300, "validation": 50, "test": 50}


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_splits_are_deterministic_and_disjoint(task):
    a = make_splits(task, SIZES, seed=3)
    b = make_splits(task, SIZES, seed=3)
    assert a == b
    prompts = {s: {example_key(r) for r in rows} for s, rows in a.items()}
    assert all(len(prompts[s]) == SIZES[s] for s in SIZES)  # unique within a split
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert make_splits(task, SIZES, seed=4) != a


def test_evaluation_splits_do_not_depend_on_train_size():
    small = make_splits("first_letter", {"train": 10, "validation": 20, "test": 20})
    large = make_splits("first_letter", {"train": 500, "validation": 20, "test": 20})
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


def test_roles_partition_the_families():
    roles = {role: set(families_with_role(role)) for role in ROLES}
    assert set().union(*roles.values()) == set(FAMILIES)
    assert sum(map(len, roles.values())) == len(FAMILIES)
    assert {"first_letter", "second_letter", "min_digit", "word_length"} <= roles["task"]
    with pytest.raises(ValueError, match="role"):
        families_with_role("held_in")


def _benchmark_formats() -> dict[str, re.Pattern]:
    """A benchmark family's prompt format: its keyword, one space, an input, "="."""
    return {name: re.compile(rf"(^|\n){re.escape(get_family(name).instruction)} [a-z0-9,]+=")
            for name in families_with_role("task")}


def test_benchmark_format_pattern_matches_benchmark_prompts():
    formats = _benchmark_formats()
    for name in formats:
        ex = get_family(name).example(random.Random(0))
        assert formats[name].search(ex["prompt"] + ex["answer"])


@pytest.mark.parametrize("role", ["pretrain", "instruct"])
def test_no_benchmark_format_in_pretraining_or_instruction_data(role):
    """The world's promise: no stage before the experts sees a held-in or held-out
    family's prompt format, so a base's held-out scores are zero-shot."""
    formats = _benchmark_formats()
    for name in families_with_role(role):
        for row in make_splits(name, {"train": 500, "validation": 5, "test": 5})["train"]:
            text = row["prompt"] + row["answer"] + "\n"
            assert not [t for t, f in formats.items() if f.search(text)], (name, row)


def test_benchmark_skills_are_pretrained_in_another_format():
    for name in families_with_role("task"):
        twin = get_family(name + PRETRAIN_SUFFIX)
        family = get_family(name)
        assert twin.role == "pretrain" and twin.instruction == family.instruction
        x = family.sample_input(random.Random(1))
        assert twin.solve(x) == family.solve(x) and twin.prompt(x) != family.prompt(x)


@pytest.mark.parametrize(
    "task, x, answer",
    [
        ("first_letter", "hello", "h"), ("last_letter", "hello", "o"),
        ("second_letter", "hello", "e"), ("reverse_word", "abc", "cba"),
        ("max_digit", "31415", "5"), ("min_digit", "31415", "1"),
        ("parity_number", "1234", "even"), ("parity_number", "1237", "odd"),
        ("word_length", "abcdefg", "7"), ("next_letter", "fuzz", "a"),
        ("prev_letter", "apple", "z"), ("larger_number", "47,82", "82"),
        ("smaller_number", "47,82", "47"),
    ],
)
def test_answers_are_correct(task, x, answer):
    family = get_family(task)
    assert family.solve(x) == answer
    assert family.parse_input(family.prompt(x)) == x


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
        if family.template != TEXT:
            assert family.solve(family.parse_input(ex["prompt"])) == ex["answer"]


def test_unknown_task_names_close_matches():
    with pytest.raises(KeyError, match="first_letter"):
        get_family("first_leter")


def test_jsonl_round_trip_and_bad_line(tmp_path):
    rows = make_splits("max_digit", SIZES)["test"]
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
