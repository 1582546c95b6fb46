"""Evaluation backends (model_args per backend, vLLM as an optional dependency) and tasks
scored by lm-eval tasks named in the config (tasks.lm_eval) rather than procedural ones."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from mergescale.evaluate import BackendUnavailable, EvalRequest, evaluate, lm_eval_score, lm_model_args
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
    from mergescale.lmeval_data import export_training_split
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
    assert export_training_split("yes_no", out, include_path=tasks, log=lambda m: None) == 5
    rows = read_jsonl(out)
    assert rows[0] == {"prompt": "Q: 0+1= ", "answer": "no"}  # lm-eval's " " target delimiter
    assert [r["answer"] for r in rows] == ["no", "yes", "no", "yes", "no"]
    no_train = yaml.safe_load(tasks.joinpath("yes_no.yaml").read_text())
    no_train.update(task="test_only")
    del no_train["training_split"]
    tasks.joinpath("test_only.yaml").write_text(yaml.safe_dump(no_train))
    with pytest.raises(ValueError, match="'test_only' has no training split"):
        export_training_split("test_only", out, include_path=tasks, log=lambda m: None)
