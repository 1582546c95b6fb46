"""Job resources as functions of the work (mergescale.resources): model sizes from a
shape, a config key, a config.json or a name; memory from what a job holds; a GPU for
forward passes only where GPUs are declared; key-naming errors."""

import json

import pytest

from mergescale.merge import get_method
from mergescale.resources import (
    WORK,
    ModelSize,
    ResourceError,
    check_gpu_placement,
    gpus_for,
    memory_mb,
    merge_work,
    model_size,
    rule_method_work,
    runtime_min,
    size_from_hf_config,
    size_from_name,
)

# Published shapes (config.json of the hub repositories) and parameter counts.
LLAMA_31_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
               "tie_word_embeddings": False}
GEMMA_2_9B = {"hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 256, "intermediate_size": 14336,
              "vocab_size": 256000, "tie_word_embeddings": True}


@pytest.mark.parametrize("cfg, published", [(LLAMA_31_8B, 8.03e9), (GEMMA_2_9B, 9.24e9)])
def test_parameters_from_config_json(cfg, published):
    params, largest = size_from_hf_config(cfg)
    assert abs(params - published) / published < 0.01
    assert largest == cfg["vocab_size"] * cfg["hidden_size"]


@pytest.mark.parametrize("name, params", [
    ("meta-llama/Llama-3.2-3B", 3e9), ("Qwen/Qwen2.5-0.5B-Instruct", 5e8), ("google/gemma-2-9b", 9e9),
    ("MergeBench/Llama-3.1-8B_math", 8e9), ("HuggingFaceTB/SmolLM2-135M-Instruct", 1.35e8),
    ("smollm2-135m-instruct.gguf", 1.35e8), ("mistralai/Mistral-Nemo-Base-2407", None),
])
def test_size_in_a_name(name, params):
    assert size_from_name(name) == params


def _config(**base):
    return {"bases": {"b": base, "b-it": {"source": "instruct", "from": "b"}}, "merge": {"dtype": "bfloat16"}}


def test_model_size_sources_in_order(tmp_path):
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    assert model_size(_config(source="pretrain", shape=shape), "b-it").source == "bases.b.shape"
    sized = model_size(_config(source="hub", repo="x/Model-7B", revision="r", parameters=7.6e9), "b")
    assert sized.parameters == 7_600_000_000 and sized.source == "bases.b.parameters"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    local = model_size(_config(source="local", path=str(tmp_path)), "b")
    assert local.source.endswith("config.json") and local.largest_tensor == 128256 * 4096
    named = model_size(_config(source="hub", repo="google/gemma-2-2b", revision="r"), "b-it")
    assert named.parameters == 2_600_000_000  # names round down: raised by the margin
    downloaded = tmp_path / "results" / "bases" / "b"
    downloaded.mkdir(parents=True)
    (downloaded / "config.json").write_text(json.dumps(GEMMA_2_9B))
    exact = model_size(_config(source="hub", repo="google/gemma-2-9b", revision="r"), "b", tmp_path / "results")
    assert abs(exact.parameters - 9.24e9) < 0.1e9


def test_unknown_size_names_the_key():
    with pytest.raises(ResourceError, match=r"bases\.b\.parameters"):
        model_size(_config(source="hub", repo="mistralai/Mistral-Nemo-Base-2407", revision="r"), "b")


NINE_B = ModelSize(9_240_000_000, 256000 * 3584, "test")


def test_memory_follows_what_a_job_holds():
    weights_mb = NINE_B.parameters * 2 / 2**20
    stream = memory_mb("merge", NINE_B, 5, "bfloat16", gpu=False)
    evaluate = memory_mb("evaluate", NINE_B, 1, "bfloat16", gpu=True)
    fit = memory_mb("merge", NINE_B, 5, "bfloat16", gpu=True, work=merge_work(get_method("adamerging")))
    stats_stream = memory_mb("merge", NINE_B, 5, "bfloat16", gpu=False, work=merge_work(get_method("fisher")))
    assert weights_mb < evaluate
    assert stream < 6 * weights_mb  # a streaming merge never holds the 6 whole models
    assert fit > 7 * weights_mb  # base, 5 experts and the merged model
    assert stream < stats_stream < fit
    assert memory_mb("merge_rule_method", NINE_B, 4, "bfloat16", True) < memory_mb("merge_rule_method", NINE_B, 5, "bfloat16", True)
    on_cpu, on_gpu = (memory_mb("finetune_expert", NINE_B, 1, "bfloat16", g) for g in (False, True))
    assert on_cpu > NINE_B.parameters * 16 / 2**20 > on_gpu > NINE_B.parameters * 8 / 2**20


def test_runtime_grows_with_size_and_work():
    small = ModelSize(500_000_000, 136_000_000, "test")
    for rule in ("evaluate", "merge", "merge_rule_method", "compute_stats"):
        assert runtime_min(rule, small, 5) < runtime_min(rule, NINE_B, 5)
    assert runtime_min("finetune_expert", NINE_B, 1, steps=100, batch=32) < \
        runtime_min("finetune_expert", NINE_B, 1, steps=1000, batch=32)


def test_gpu_only_for_forward_passes_and_only_where_declared():
    assert gpus_for("evaluate", None) == 0  # a local run that declares no GPUs
    assert gpus_for("evaluate", 0) == 0  # a cluster without GPUs
    assert gpus_for("evaluate", 4) == gpus_for("finetune_expert", 4) == gpus_for("tune", 4) == 1
    assert gpus_for("merge", 4) == gpus_for("merge_rule_method", 4, rule_method_work("lora_lego")) == 0
    assert gpus_for("merge_rule_method", 4, rule_method_work("twin_merging")) == 1
    assert gpus_for("merge", 4, merge_work(get_method("regmean_plus_plus"))) == 1
    assert gpus_for("merge", 4, merge_work(get_method("ties"))) == 0
    assert [r for r, w in WORK.items() if not w.forward] == ["merge", "import_base",
                                                           "compute_task_vector_stats"]


def test_gpu_placement_errors_name_the_key():
    check_gpu_placement(["evaluate"], 0, {}, cluster=True)  # declared: no GPUs, on purpose
    check_gpu_placement(["evaluate"], None, {}, cluster=False)  # a local run
    with pytest.raises(ResourceError, match="profile key resources: declare the GPUs"):
        check_gpu_placement(["evaluate"], None, {}, cluster=True)
    with pytest.raises(ResourceError, match=r"set-resources\.evaluate\.gpu"):
        check_gpu_placement(["evaluate"], 8, {"evaluate": {"gpu": 0}}, cluster=True)
    check_gpu_placement(["evaluate"], 8, {"merge": {"gpu": 0}}, cluster=True)  # not a forward pass


def test_vllm_adds_its_host_side_to_evaluation_only():
    hf = memory_mb("evaluate", NINE_B, 1, "bfloat16", True)
    assert memory_mb("evaluate", NINE_B, 1, "bfloat16", True, backend="vllm") == hf + 6000
    assert memory_mb("merge", NINE_B, 5, "bfloat16", False, backend="vllm") == memory_mb("merge", NINE_B, 5, "bfloat16", False)


def test_cluster_profile_threads_match_the_cpus_jobs_ask_for():
    """The profile's set-threads (torch threads) and the workflow's cpus_per_task agree."""
    from pathlib import Path

    import yaml

    from mergescale.resources import CPUS

    profile = Path(__file__).resolve().parents[1] / "workflow" / "profiles" / "slurm" / "config.yaml"
    threads = yaml.safe_load(profile.read_text())["set-threads"]
    assert threads == {rule: CPUS[work.kind] for rule, work in WORK.items()}
