"""Parity with mergekit 0.1.5 on the methods both implement (deterministic ones).

mergekit runs through its own CLI (`mergekit-yaml`) from a separate virtual
environment, given by MERGEKIT_VENV; both tools read the same YAML. Create it with:

    python3 -m venv benchmarks/.cache/mergekit-venv
    benchmarks/.cache/mergekit-venv/bin/pip install mergekit==0.1.5 torch==2.13.0
    MERGEKIT_VENV=benchmarks/.cache/mergekit-venv pytest tests/test_merge_parity.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from merge_fixtures import load_state, run_mergekit, save_tiny_llama
from mergescale.merge import run_merge
from mergescale.merge.config import parse_merge_config

VENV = os.environ.get("MERGEKIT_VENV")
pytestmark = pytest.mark.skipif(
    not VENV, reason="MERGEKIT_VENV is not set (a venv with mergekit==0.1.5; see this file's docstring)"
)

# name -> (uses the base, per-expert parameters, global parameters, input dtype)
CASES = {
    "linear": (False, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}], {}, "float32"),
    "task_arithmetic": (True, [{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.3}], {"lambda": 0.8}, "float32"),
    "ties": (True, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.5}, {"weight": 1.0, "density": 0.2}],
             {"lambda": 1.2}, "float32"),
    # bf16 checkpoints; mergekit computing in float32 (out_dtype bf16) or in bf16 itself
    "ties_bf16": (True, [{"weight": 1.0, "density": 0.2}] * 3, {}, "bfloat16"),
    "ties_bf16_compute": (True, [{"weight": 1.0, "density": 0.2}] * 3, {}, "bfloat16"),
    "breadcrumbs": (True, [{"weight": 1.0, "density": 0.5, "gamma": 0.02}] * 3, {}, "float32"),
    "breadcrumbs_ties": (True, [{"weight": 1.0, "density": 0.4, "gamma": 0.05}, {"weight": 0.7, "density": 0.4, "gamma": 0.05},
                                {"weight": 1.0, "density": 0.9, "gamma": 0.2}], {"normalize": True}, "float32"),
    "model_stock": (True, [{}, {}, {}], {}, "float32"),
    "slerp": (True, [{}], {"t": 0.3}, "float32"),
    "multislerp": (True, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], {}, "float32"),
    "karcher": (False, [{}, {}, {}], {}, "float32"),
    "sce": (True, [{}, {}, {}], {"select_topk": 0.5}, "float32"),
    "passthrough": (False, [{"scale": 0.5}], {}, "float32"),
}


def case_yaml(name: str, base: Path, experts: list[Path], dtype: str) -> str:
    uses_base, expert_params, params, _ = CASES[name]
    method = name.split("_bf16")[0]
    if name.endswith("_bf16"):  # mergekit computes in float32, like mergescale always does
        config = {"merge_method": method, "dtype": "float32", "out_dtype": dtype, "models": []}
    else:
        config = {"merge_method": method, "dtype": dtype, "models": []}
    if uses_base:
        config["base_model"] = str(base)
    for path, p in zip(experts, expert_params):
        config["models"].append({"model": str(path), **({"parameters": p} if p else {})})
    if params:
        config["parameters"] = params
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    """Models, YAMLs, and mergekit's outputs for every case (run two at a time)."""
    root = tmp_path_factory.mktemp("parity")
    inputs = {}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        base = save_tiny_llama(root / dtype / "base", 0, dtype=torch_dtype, max_shard_size="1GB")
        experts = [save_tiny_llama(root / dtype / f"e{i}", 20 + i, like=base, noise=0.05, dtype=torch_dtype,
                                   max_shard_size="1GB") for i in range(3)]
        inputs[dtype] = (base, experts)
    jobs = []
    for name, (_, expert_params, _, dtype) in CASES.items():
        base, experts = inputs[dtype]
        config = root / f"{name}.yaml"
        config.write_text(case_yaml(name, base, experts[: len(expert_params)], dtype))
        jobs.append((name, config, root / f"mergekit_{name}"))
    return run_mergekit(VENV, jobs, root)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_mergekit(mergekit_outputs, tmp_path, name):
    config, theirs, returncode, log = mergekit_outputs[name]
    assert returncode == 0, log.read_text()[-3000:]
    ours = tmp_path / "ours"
    run_merge(parse_merge_config(yaml.safe_load(config.read_text()), ours))
    a, b = load_state(ours), load_state(theirs)
    assert set(a) == set(b)
    if CASES[name][3] == "bfloat16":
        # Ties in |tau| are common in bf16 and mergekit's argsort breaks them arbitrarily,
        # so a few entries of the trim differ; computing in bf16, mergekit also rounds its
        # sums, which flips the elected sign of near-zero votes now and then.
        bf16_compute = name.endswith("_compute")
        base = load_state(Path(yaml.safe_load(config.read_text())["base_model"]))
        close = total = 0
        diff = delta = 0.0
        for key in b:
            x, y, z = a[key].float(), b[key].float(), base[key].float()
            close += int(((x - y).abs() <= 2 * torch.maximum(x.abs(), y.abs()) * 2.0**-8).sum())
            total += x.numel()
            diff += float(((x - y) ** 2).sum())
            delta += float(((y - z) ** 2).sum())
        assert close / total > (0.99 if bf16_compute else 0.999)
        assert (diff / delta) ** 0.5 < (0.1 if bf16_compute else 0.05)
    else:
        for key in sorted(b):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
