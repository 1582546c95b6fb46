"""Evaluation backends (model_args per backend, vLLM as an optional dependency) and tasks
scored by lm-eval tasks named in the config (tasks.lm_eval) rather than procedural ones."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from mergescale.evaluate.harness import BackendUnavailable, EvalRequest, evaluate, lm_eval_score, lm_model_args
from test_hub import tiny_checkpoint


def test_hf_model_args():
    req = EvalRequest(model_dir=Path("/m"), task_dir=None, tasks=(), backend="hf", device="cpu",
                      batch_size=8)
    assert lm_model_args(req) == ("hf", {"pretrained": "/m", "device": "cpu", "batch_size": 8,
                                         "dtype": "float32", "trust_remote_code": False})
    gpu = EvalRequest(model_dir=Path("/m"), task_dir=None, tasks=(), device="cuda:0")
    assert lm_model_args(gpu)[1]["dtype"] == "auto"  # the checkpoint's own dtype on a GPU


def test_vllm_model_args():
    req = EvalRequest(model_dir=Path("/m"), task_dir=None, tasks=(), backend="vllm", seed=3)
    assert lm_model_args(req) == ("vllm", {"pretrained": "/m", "dtype": "auto", "batch_size": "auto",
                                           "seed": 3, "trust_remote_code": False})


def test_unknown_backend_names_the_key():
    req = EvalRequest(model_dir=Path("/m"), task_dir=None, tasks=(), backend="tgi")
    with pytest.raises(ValueError, match="evaluate.backend: unknown backend 'tgi'"):
        lm_model_args(req)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_without_vllm_is_one_clear_error(tmp_path):
    req = EvalRequest(model_dir=tmp_path, task_dir=None, tasks=(), backend="vllm",
                      lm_eval_tasks={"math": {"metrics": {"gsm8k": "exact_match,strict-match"}}})
    with pytest.raises(BackendUnavailable, match=r"evaluate\.backend: 'vllm' needs the optional "
                                                 r"dependency vllm.*mergescale\[vllm\]"):
        evaluate(req, log=lambda m: None)


def _choice_task(task_dir: Path, name: str, rows: list[dict]) -> None:
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_dir.joinpath(f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
    }))


def test_lm_eval_task_scores_are_read_from_the_harness(tmp_path):
    """A task named by two lm-eval tasks scores the mean of their metric; each part equals
    what a separate lm-eval run reports for that task alone."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = tiny_checkpoint(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    letters = "abcdefghijklmnop"
    _choice_task(tasks, "pick_a", [{"prompt": f"{c}:", "choices": ["a", "b", "c"], "label": i % 3}
                                   for i, c in enumerate(letters)])
    _choice_task(tasks, "pick_b", [{"prompt": f"{c}{c}:", "choices": ["x", "y"], "label": i % 2}
                                   for i, c in enumerate(letters[:10])])
    spec = {"metrics": {"pick_a": "acc,none", "pick_b": "acc,none"}, "cluster": "choice"}
    req = EvalRequest(model_dir=model, task_dir=tasks, tasks=(), device="cpu", batch_size=16,
                      lm_eval_tasks={"choice": spec})
    result = evaluate(req, log=lambda m: None)
    (row,) = result["scores"]
    assert row["task"] == "choice" and row["cluster"] == "choice" and row["split"] == "test"
    assert row["n"] == 16 + 10
    assert row["value"] == pytest.approx((row["parts"]["pick_a"] + row["parts"]["pick_b"]) / 2)
    lm = HFLM(pretrained=str(model), device="cpu", batch_size=16, dtype="float32")
    alone = lm_eval.simple_evaluate(model=lm, tasks=["pick_a"],
                                    task_manager=TaskManager(include_path=str(tasks),
                                                             include_defaults=False))
    assert row["parts"]["pick_a"] == pytest.approx(alone["results"]["pick_a"]["acc,none"])
    assert 0 < row["parts"]["pick_a"] < 1  # a real score, not a default


def test_missing_metric_names_the_config_key():
    out = {"results": {"gsm8k": {"exact_match,flexible-extract": 0.5}}, "n-samples": {}}
    with pytest.raises(KeyError, match=r"tasks\.lm_eval\.math\.metrics\.gsm8k.*exact_match,strict-match"
                                       r".*exact_match,flexible-extract"):
        lm_eval_score("math", {"metrics": {"gsm8k": "exact_match,strict-match"}}, out)


def test_group_sample_counts_add_up():
    out = {"results": {"math": {"exact_match,none": 0.25, "exact_match_stderr,none": 0.01}},
           "groups": {}, "group_subtasks": {"math": ["m_alg", "m_geo"]},
           "n-samples": {"m_alg": {"effective": 30, "original": 30},
                         "m_geo": {"effective": 12, "original": 12}}}
    row = lm_eval_score("maths", {"metrics": {"math": "exact_match,none"}}, out)
    assert (row["value"], row["n"], row["stderr"], row["cluster"]) == (0.25, 42, 0.01, "maths")


def test_training_split_of_an_lm_eval_task_becomes_prompt_answer_rows(tmp_path):
    from mergescale.tasks.lmeval_data import export_training_split
    from mergescale.tasks import read_jsonl

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    train = tasks / "train.jsonl"
    train.write_text("".join(json.dumps({"q": f"{i}+1=", "choices": ["no", "yes"], "label": i % 2})
                             + "\n" for i in range(5)))
    tasks.joinpath("yes_no.yaml").write_text(yaml.safe_dump({
        "task": "yes_no", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(train), "test": str(train)}},
        "training_split": "train", "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "Q: {{q}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}], "metadata": {"version": 1},
    }))
    out = tmp_path / "data" / "yes_no" / "train.jsonl"
    # no validation split: one of the 5 documents is held back for validation
    assert export_training_split("yes_no", out, include_path=tasks, log=lambda m: None) == 4
    rows = read_jsonl(out)
    assert rows[0]["answer"] in ("no", "yes") and rows[0]["prompt"].endswith("+1= ")  # lm-eval's " " delimiter
    all_rows = [{"prompt": f"Q: {i}+1= ", "answer": ["no", "yes"][i % 2]} for i in range(5)]
    assert all(r in all_rows for r in rows)
    no_train = yaml.safe_load(tasks.joinpath("yes_no.yaml").read_text())
    no_train.update(task="test_only")
    del no_train["training_split"]
    tasks.joinpath("test_only.yaml").write_text(yaml.safe_dump(no_train))
    with pytest.raises(ValueError, match="'test_only' has no training split"):
        export_training_split("test_only", out, include_path=tasks, log=lambda m: None)


SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def _local_task(tasks, name: str, n: int, splits: dict[str, str]) -> None:
    """An lm-eval task over JSONL files the test writes: one file per split, each row's
    question prefixed by the split's tag."""
    files = {}
    for split, tag in splits.items():
        path = tasks / f"{name}_{split}.jsonl"
        path.write_text("".join(json.dumps({"q": f"{tag}{i}", "choices": ["no", "yes"], "label": i % 2})
                                + "\n" for i in range(n)))
        files[split] = str(path)
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "output_type": "multiple_choice", "doc_to_text": "Q: {{q}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}], "metadata": {"version": 1},
            **{SPLIT_KEYS[split]: split for split in splits}}
    tasks.joinpath(f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_validation_rows_never_overlap_training_or_scored_rows(tmp_path):
    """A task with its own validation split (scored on test) validates on it; a task
    scored on its validation split validates on a held-back slice of its training split,
    which the training rows then leave out."""
    from mergescale.tasks.lmeval_data import HOLDOUT_FRACTION, export_split
    from mergescale.tasks import read_jsonl

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_task(tasks, "three_splits", 40, {"train": "tr", "validation": "va", "test": "te"})
    _local_task(tasks, "scored_on_val", 40, {"train": "tr", "validation": "va"})
    quiet = dict(include_path=tasks, log=lambda m: None)
    out = tmp_path / "out"
    assert export_split("three_splits", "validation", out / "a_val.jsonl", **quiet) == 40
    assert export_split("three_splits", "train", out / "a_train.jsonl", **quiet) == 40
    assert all("va" in r["prompt"] for r in read_jsonl(out / "a_val.jsonl"))
    held = int(40 * HOLDOUT_FRACTION)
    assert export_split("scored_on_val", "validation", out / "b_val.jsonl", **quiet) == held
    assert export_split("scored_on_val", "train", out / "b_train.jsonl", **quiet) == 40 - held
    val = {r["prompt"] for r in read_jsonl(out / "b_val.jsonl")}
    train = {r["prompt"] for r in read_jsonl(out / "b_train.jsonl")}
    assert not val & train and all("tr" in p for p in val | train) and len(val | train) == 40
    # several tasks: interleaved, so that the first rows sample each
    assert export_split(["three_splits", "scored_on_val"], "validation", out / "ab.jsonl", **quiet) == 40 + held
    first = [r["prompt"] for r in read_jsonl(out / "ab.jsonl")[:2]]
    assert "va" in first[0] and "tr" in first[1]


def test_validation_rows_render_as_an_lm_eval_task(tmp_path, monkeypatch):
    """The rows become a task YAML that lm-eval loads, with every row a document."""
    from lm_eval.tasks import TaskManager

    from mergescale.tasks.lmeval_data import export_split
    from mergescale.tasks.lmeval_yaml import lm_eval_task_name, write_rows_task_yaml

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_task(tasks, "three_splits", 12, {"train": "tr", "validation": "va", "test": "te"})
    data = tmp_path / "results" / "data" / "yn" / "validation.jsonl"
    export_split("three_splits", "validation", data, include_path=tasks, log=lambda m: None)
    rendered = tmp_path / "results" / "tasks"
    write_rows_task_yaml("yn", "validation", data, rendered / "yn_validation.yaml",
                         description="validation rows of three_splits", cluster="yes_no")
    spec = yaml.safe_load((rendered / "yn_validation.yaml").read_text())
    assert spec["generation_kwargs"]["until"] == ["\n"] and spec["tag"] == ["mergescale_validation", "mergescale_yes_no"]
    monkeypatch.chdir(tmp_path)
    name = lm_eval_task_name("yn", "validation")
    task = TaskManager(include_path=str(rendered), include_defaults=False).load([name])["tasks"][name]
    docs = list(task.test_docs())
    assert len(docs) == 12 and task.doc_to_target(docs[0]) in ("no", "yes")
