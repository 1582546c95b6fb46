"""Parity with mergekit 0.1.5 on configs as people write them: gradients, filters,
slices, mixed input dtypes, out_dtype, int8_mask, tokenizer_source, no base_model, and
the methods nuslerp, arcee_fusion, nearswap, ram, ramplus_tl.

Both tools read the same YAML; mergekit runs from MERGEKIT_VENV (see test_merge_parity.py).
Inputs: 4-layer tiny Llamas in float32 sharing one word-level tokenizer, plus one expert
in bfloat16 (`half`), so that gradients and slices have layers to act on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from merge_fixtures import load_state, run_mergekit, save_tiny_llama, save_word_tokenizer, tiny_llama_config
from mergescale.merge import run_merge
from mergescale.merge.config import parse_merge_config

VENV = os.environ.get("MERGEKIT_VENV")
pytestmark = pytest.mark.skipif(
    not VENV, reason="MERGEKIT_VENV is not set (a venv with mergekit==0.1.5; see test_merge_parity.py)"
)

CONFIGS = {
    # a bf16 expert on a float32 base; int8_mask is a memory hint
    "ties_mixed_dtypes_int8_mask": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {half}
    parameters: {{weight: 0.7, density: 0.3}}
parameters: {{int8_mask: true, lambda: 0.9}}
dtype: float32
""",
    "task_arithmetic_out_dtype_tokenizer_base": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
""",
    "linear_no_base_mixed_dtypes": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 2.0}}
  - model: {half}
    parameters: {{weight: 1.0}}
dtype: float32
""",
    # a base given but not listed: mergekit merges it as one more model
    "karcher_base_added": """
merge_method: karcher
base_model: {base}
models:
  - model: {a}
  - model: {b}
dtype: float32
""",
    "slerp_gradient_filters": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "ties_gradients_per_model": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      density: [0.2, 0.8]
      weight:
        - filter: mlp
          value: 0.5
        - value: 1.0
  - model: {b}
    parameters:
      density: 0.4
      weight: [1.0, 0.2, 0.6]
parameters:
  lambda: [0.5, 1.5]
  normalize: [true, false]
dtype: float32
""",
    "passthrough_stacking": """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
dtype: float32
""",
    "slerp_per_slice": """
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {a}
        layer_range: [0, 2]
    parameters: {{t: 0.2}}
  - sources:
      - model: {a}
        layer_range: [2, 4]
      - model: {b}
        layer_range: [1, 3]
    base_model: {b}
    parameters:
      t: [0.3, 0.9]
parameters:
  t: 0.5
dtype: float32
""",
    "ties_slices_source_parameters": """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
        parameters: {{density: 0.3}}
      - model: {b}
        layer_range: [0, 4]
        parameters: {{density: [0.6, 0.2]}}
    parameters: {{weight: 0.5}}
parameters:
  weight: 1.0
dtype: float32
""",
    "nuslerp_no_base": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "nuslerp_base_columns": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: float32
""",
    "nuslerp_base_rows": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {half}
    parameters: {{weight: 0.4}}
parameters: {{nuslerp_flatten: false}}
dtype: float32
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {a}
dtype: float32
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters: {{t: 0.02}}
dtype: float32
""",
    "ram": """
merge_method: ram
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters: {{epsilon: 0.03}}
dtype: float32
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters: {{epsilon: 0.03, r: 0.5, alpha: 0.3}}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_configs")
    config = tiny_llama_config(num_hidden_layers=4)
    init = save_tiny_llama(root / "init", 0, config=config, max_shard_size="1GB")
    # noise on the base too: freshly initialised norms are exactly 1, which would make a bf16
    # expert's task vector a multiple of its ulp there, full of ties that TIES breaks arbitrarily
    models = {"base": save_tiny_llama(root / "base", 1, like=init, noise=0.05, max_shard_size="1GB")}
    for i, name in enumerate("abc"):
        models[name] = save_tiny_llama(root / name, 30 + i, like=models["base"], noise=0.05, max_shard_size="1GB")
    models["half"] = save_tiny_llama(root / "half", 40, like=models["base"], noise=0.05, dtype=torch.bfloat16,
                                     max_shard_size="1GB")
    for path in models.values():
        save_word_tokenizer(path)
    jobs = []
    for name, text in CONFIGS.items():
        path = root / f"{name}.yaml"
        path.write_text(text.format(**{k: str(v) for k, v in models.items()}))
        jobs.append((name, path, root / f"mergekit_{name}"))
    return run_mergekit(VENV, jobs, root)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_parity_with_mergekit(mergekit_outputs, tmp_path, name):
    config, theirs, returncode, log = mergekit_outputs[name]
    assert returncode == 0, log.read_text()[-3000:]
    ours = tmp_path / "ours"
    run_merge(parse_merge_config(yaml.safe_load(config.read_text()), ours))
    a, b = load_state(ours), load_state(theirs)
    assert sorted(a) == sorted(b)
    for key in sorted(b):
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
    layers = json.loads((theirs / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == layers
