"""Batched evaluation: several models scored in one lm-eval session give exactly the
scores that one evaluate() per model gives."""

import pytest
import torch

from mergescale.evaluate.harness import BatchEvaluator, Candidate, EvalRequest, evaluate
from mergescale.merge.in_memory import load_state
from mergescale.training.stages import finetune, pretrain_base
from mergescale.tasks import make_splits, write_jsonl
from mergescale.tasks.lmeval_yaml import write_task_yaml

SHAPE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TASKS = ("first_letter", "last_letter")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched")
    data = {}
    for task in TASKS:
        splits = make_splits(task, {"train": 300, "validation": 20, "test": 20})
        for split, rows in splits.items():
            write_jsonl(rows, root / "data" / task / f"{split}.jsonl")
        for split in ("validation", "test"):
            write_task_yaml(task, split, root / "data" / task / f"{split}.jsonl",
                            root / "tasks" / f"{task}_{split}.yaml")
        data[task] = root / "data" / task / "train.jsonl"
    torch.set_num_threads(1)
    quiet = dict(log=lambda m: None)
    pretrain_base(SHAPE, {"steps": 20, "batch_size": 16}, data, root / "base", **quiet)
    finetune(root / "base", {"steps": 80, "batch_size": 32, "lr": 5e-3}, {"first_letter": data["first_letter"]},
             root / "expert", stage="finetune_expert", **quiet)
    return root


def test_batch_scores_equal_one_evaluation_per_model(models):
    tasks = tuple((t, "test") for t in TASKS)
    separate = {name: evaluate(EvalRequest(model_dir=models / name, task_dir=models / "tasks", tasks=tasks),
                               log=lambda m: None)
                for name in ("expert", "base")}
    evaluator = BatchEvaluator(models / "base", models / "tasks", log=lambda m: None)
    batch = [  # a directory, then an in-memory state dict, then one task only
        Candidate("expert-dir", models / "expert", tasks),
        Candidate("base-state", load_state(models / "base"), tasks),
        Candidate("expert-one-task", load_state(models / "expert"), tasks[:1]),
    ]
    results = {c.name: r for c, r in evaluator.score(batch)}
    assert evaluator.n_scored == 3
    for cand, name in (("expert-dir", "expert"), ("base-state", "base")):
        got = [(s["task"], s["correct"]) for s in results[cand]["scores"]]
        assert got == [(s["task"], s["correct"]) for s in separate[name]["scores"]]
    assert results["expert-one-task"]["scores"] == separate["expert"]["scores"][:1]
    # the expert learnt its task: the comparison is not between two all-zero vectors
    assert separate["expert"]["scores"][0]["value"] > separate["base"]["scores"][0]["value"]


def test_a_candidate_of_another_shape_is_named(models, tmp_path):
    state = load_state(models / "base")
    name = next(n for n, t in state.items() if t.ndim == 2)
    state[name] = torch.zeros(3, 3)
    evaluator = BatchEvaluator(models / "base", models / "tasks", log=lambda m: None)
    with pytest.raises(ValueError, match="candidate odd: weights do not fit"):
        list(evaluator.score([Candidate("odd", state, (("first_letter", "test"),))]))


def test_batch_job_writes_what_one_job_per_model_writes(models, tmp_path):
    """evaluate_batch_and_save + write_batch_member (rules evaluate_batch and
    unbatch_scores) write the scores.json that evaluate_and_save (rule evaluate) writes,
    model card included."""
    import json

    from mergescale.evaluate.batch_member import write_batch_member
    from mergescale.evaluate.harness import evaluate_and_save, evaluate_batch_and_save

    tasks = tuple((t, "test") for t in TASKS)
    template = EvalRequest(model_dir=models / "base", task_dir=models / "tasks", tasks=tasks)
    dirs = [models / "base", models / "expert"]
    evaluate_batch_and_save(template, dirs, tmp_path / "batch.json", log=lambda m: None)
    for d in dirs:
        write_batch_member(tmp_path / "batch.json", str(d), tmp_path / "batch" / d.name / "scores.json")
        one = tmp_path / "one" / d.name / "scores.json"
        evaluate_and_save(EvalRequest(model_dir=d, task_dir=models / "tasks", tasks=tasks), one,
                          log=lambda m: None)
        batch = json.loads((tmp_path / "batch" / d.name / "scores.json").read_text())
        single = json.loads(one.read_text())
        assert batch["scores"] == single["scores"]
        assert batch["model_dir"] == single["model_dir"] == str(d)
        assert batch["model_card"] == single["model_card"]  # the training card, carried along
        assert batch["batch"] == 2
    with pytest.raises(KeyError, match="no result for elsewhere"):
        write_batch_member(tmp_path / "batch.json", "elsewhere", tmp_path / "x.json")


def test_batch_job_refuses_what_it_cannot_score_alike(models, tmp_path):
    from mergescale.evaluate.harness import evaluate_batch_and_save

    tasks = (("first_letter", "test"),)
    chat = EvalRequest(model_dir=models / "base", task_dir=models / "tasks", tasks=tasks,
                       apply_chat_template=True)
    with pytest.raises(ValueError, match="chat"):
        evaluate_batch_and_save(chat, [models / "base"], tmp_path / "a.json")
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "model_spec.json").write_text("{}")
    plain = EvalRequest(model_dir=models / "base", task_dir=models / "tasks", tasks=tasks)
    with pytest.raises(ValueError, match="spec"):
        evaluate_batch_and_save(plain, [models / "base", spec], tmp_path / "a.json")
    assert not (tmp_path / "a.json").exists()  # refused before anything was scored


def test_tuning_scores_each_candidate_as_its_own_evaluation_would(models, tmp_path):
    """tune_merge scores every grid point in one lm-eval session; each candidate's
    validation scores equal evaluate() on that candidate's merged checkpoint."""
    from mergescale.merge import MergeRequest, run_merge
    from mergescale.evaluate.tuning import tune_merge

    space = {"lambda": [0.2, 1.0]}
    record = tune_merge(method="task_arithmetic", base=models / "base", experts=[models / "expert"],
                        space=space, fixed={}, task_dir=models / "tasks", tasks=list(TASKS),
                        out=tmp_path / "tuning.json", log=lambda m: None)
    assert [c["params"] for c in record["candidates"]] == [{"lambda": 0.2}, {"lambda": 1.0}]
    for cand in record["candidates"]:
        out = tmp_path / f"lambda{cand['params']['lambda']}"
        run_merge(MergeRequest(method="task_arithmetic", base=models / "base", experts=[models / "expert"],
                               out_dir=out, params=cand["params"], progress=False))
        alone = evaluate(EvalRequest(model_dir=out, task_dir=models / "tasks",
                                     tasks=tuple((t, "validation") for t in TASKS)), log=lambda m: None)
        assert cand["validation"] == {s["task"]: s["value"] for s in alone["scores"]}
    means = [c["mean"] for c in record["candidates"]]
    assert record["chosen"] == record["candidates"][means.index(max(means))]["params"]
    # the grid points differ: the comparison is not between two identical models
    assert record["candidates"][0]["validation"] != record["candidates"][1]["validation"]
