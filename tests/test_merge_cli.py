"""`mergescale merge` / `mergescale methods` and the mergekit-style YAML parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_fixtures import load_state, save_tiny_llama
from mergescale.cli import main
from mergescale.merge import MergeInputError, MergeRequest, run_merge
from mergescale.merge.config import parse_merge_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    base = save_tiny_llama(root / "base", 0, max_shard_size="1GB")
    return base, save_tiny_llama(root / "a", 1, like=base), save_tiny_llama(root / "b", 2, like=base)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def ties_yaml(base, a, b) -> str:
    return f"""
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters:
  density: 0.3
  normalize: true
dtype: bfloat16
"""


def test_parse_mergekit_yaml(models, tmp_path):
    import yaml

    base, a, b = models
    req = parse_merge_config(yaml.safe_load(ties_yaml(base, a, b)), tmp_path / "out", threads=1)
    assert req.method == "ties" and req.base == base and req.experts == [a, b]  # base entry dropped
    assert req.expert_params == [{"weight": 1.0, "density": 0.5}, {"weight": 0.5}]
    assert req.params == {"density": 0.3, "normalize": True}
    assert req.dtype == "bfloat16" and req.threads == 1 and req.seed == 0


@pytest.mark.parametrize("edit, match", [
    (lambda y: y.replace("merge_method: ties", "merge_method: tie"), r"\(did you mean ties, dare_ties\?\)"),
    (lambda y: y + "slices: []\n", "models, slices: give exactly one of them"),
    (lambda y: y + "tokenizer: {source: base}\n", "tokenizer: tokenizer surgery"),
    (lambda y: y + "chat_template: chatml\n", "chat_template: chat template selection"),
    (lambda y: y.replace("merge_method: ties", "merge_method: regmean"), "merge_method: regmean reads"),
    (lambda y: y.replace("normalize: true", "normalize: true\n  int8_mask: 1"), "parameters.int8_mask: expected true/false"),
    (lambda y: y + "modules: {}\n", "modules: per-module configurations are not supported"),
    (lambda y: y + "tokenizer_source: union\n", "tokenizer_source: only 'base' is supported"),
    (lambda y: y + "colour: red\n", "colour: unknown key"),
    (lambda y: y.replace("density: 0.3", "density: {fliter: mlp, value: 0.5}"), r"parameters.density\[0\].fliter: unknown key"),
    (lambda y: y.replace("density: 0.3", "density: []"), "parameters.density: expected a value"),
    (lambda y: y.replace("density: 0.5}", "densty: 0.5}"), r"models\[1\].*densty"),
    (lambda y: y.replace("density: 0.5}", "density: 1.5}"), r"models\[1\].density=1.5 is outside"),
    (lambda y: y.replace("dtype: bfloat16", "dtype: int4"), "dtype: 'int4'"),
    (lambda y: y.replace("models:\n  - model:", "models:\n  - model: /nonexistent\n  - model:", 1),
     r"models\[0\].model: '/nonexistent' is not a local model directory"),
])
def test_config_errors_name_the_key(models, tmp_path, edit, match):
    import yaml

    with pytest.raises(MergeInputError, match=match):
        parse_merge_config(yaml.safe_load(edit(ties_yaml(*models))), tmp_path / "out")


def _slices_config(base, a, b, first=(0, 2), second=(0, 2), extra=""):
    return f"""
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: {list(first)}}}
      - {{model: {a}, layer_range: {list(second)}}}
{extra}
parameters: {{t: 0.5}}
"""


@pytest.mark.parametrize("kw, match", [
    (dict(second=(0, 3)), r"slices\[0\].sources\[1\].layer_range: \[0, 3\] is outside the 2 layers"),
    (dict(second=(1, 2)), r"slices\[0\]: every source must span the same number of layers"),
    (dict(extra="    residual_weight: 0.5"), r"slices\[0\].residual_weight: unknown or unsupported key"),
    (dict(extra="    base_model: {b}"), r"slices\[0\]: the base model .* is not among the slice's sources"),
])
def test_slice_errors_name_the_key(models, tmp_path, kw, match):
    import yaml

    base, a, b = models
    if "extra" in kw:
        kw["extra"] = kw["extra"].format(b=b)
    req = None
    with pytest.raises(MergeInputError, match=match):
        req = parse_merge_config(yaml.safe_load(_slices_config(base, a, b, **kw)), tmp_path / "out")
        run_merge(req)  # layer ranges are checked against the checkpoints, before writing
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_base_refuses_another_vocabulary(models, tmp_path):
    from merge_fixtures import save_word_tokenizer

    base = save_tiny_llama(tmp_path / "base", 4, like=models[0], max_shard_size="1GB")
    other = save_tiny_llama(tmp_path / "other", 5, like=models[0], max_shard_size="1GB")
    save_word_tokenizer(base)
    save_word_tokenizer(other, vocab_size=64)
    config = {"merge_method": "linear", "base_model": str(base), "tokenizer_source": "base",
              "models": [{"model": str(base)}, {"model": str(other)}]}
    with pytest.raises(MergeInputError, match=r"tokenizer_source: the tokenizer of .*other differs"):
        parse_merge_config(config, tmp_path / "out")


def test_linear_keeps_a_listed_base_as_an_expert(models, tmp_path):
    base, a, _ = models
    req = parse_merge_config(
        {"merge_method": "linear", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(a)}]},
        tmp_path / "o",
    )
    assert req.experts == [base, a]


def test_cli_merge_equals_api(models, tmp_path, capsys):
    base, a, b = models
    config = write_yaml(tmp_path / "ties.yaml", ties_yaml(base, a, b))
    assert main(["merge", str(config), str(tmp_path / "cli"), "--threads", "1", "--seed", "3"]) == 0
    assert "ties of 2 experts" in capsys.readouterr().out
    run_merge(MergeRequest(method="ties", base=base, experts=[a, b], out_dir=tmp_path / "api", dtype="bfloat16",
                           params={"density": 0.3, "normalize": True},
                           expert_params=[{"weight": 1.0, "density": 0.5}, {"weight": 0.5}]))
    cli, api = load_state(tmp_path / "cli"), load_state(tmp_path / "api")
    assert all(torch.equal(cli[k], api[k]) for k in api)
    assert json.loads((tmp_path / "cli" / "merge_card.json").read_text())["seed"] == 3


def test_cli_error_is_one_line(models, tmp_path, capsys):
    config = write_yaml(tmp_path / "bad.yaml", ties_yaml(*models).replace("density: 0.3", "densty: 0.3"))
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergescale merge: error:") and "densty" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_missing_config(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "none.yaml"), str(tmp_path / "out")]) == 2
    assert "none.yaml: cannot read" in capsys.readouterr().err


def test_cli_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"ties", "slerp", "tsv", "layer_swap"} <= set(methods)
    density = next(h for h in methods["ties"]["hyperparameters"] if h["name"] == "density")
    assert density["per_expert"] and density["range"] == "(0, 1]" and density["default"] == 1.0
    assert methods["dare_ties"]["randomised"] and methods["ties"]["needs_base"]


def test_cli_methods_lists_rule_methods_too(capsys):
    assert main(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    rules = {"twin_merging", "opcm", "map", "lora_lego", "atlas", "task_arithmetic_tuned"}
    assert rules <= set(methods)
    assert {methods[n]["kind"] for n in rules} == {"rule"} and methods["ties"]["kind"] == "per-tensor"
    assert methods["twin_merging"]["output"] == "model_spec" and methods["atlas"]["output"] == "checkpoint"
    assert methods["twin_merging"]["needs"] == ["validation_data"] and methods["opcm"]["own_rule"]
    alpha = next(h for h in methods["opcm"]["hyperparameters"] if h["name"] == "alpha")
    assert alpha["default"] == 0.5 and alpha["range"] == "[0, 1]"
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "\nper-tensor  ties [base]:" in text and "\nrule        atlas [validation_data, checkpoint]:" in text


def test_cli_methods_text(capsys):
    assert main(["methods"]) == 0
    assert "ties [base]:" in capsys.readouterr().out


def test_progress_bar_is_one_updating_line_with_rate_and_eta(models, tmp_path, capsys):
    base, a, b = models
    run_merge(MergeRequest(method="ties", base=base, experts=[a, b], out_dir=tmp_path / "o", progress=True))
    err = capsys.readouterr().err
    bar = err.split("\r")[-1]  # tqdm redraws one line with carriage returns
    assert "\n" not in bar.strip() and "tensor/s" in bar and "<" in bar  # rate, elapsed<remaining
    # without a terminal (the workflow's log files) no bar is drawn
    run_merge(MergeRequest(method="ties", base=base, experts=[a, b], out_dir=tmp_path / "q"))
    assert "\r" not in capsys.readouterr().err
