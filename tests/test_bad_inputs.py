"""Bad input, faults and untrusted checkpoints: the catalogue (issue 8).

Each item of the issue, and the test that covers it. Items tested elsewhere are not
repeated here; the rest are below.

Config (validated before any job runs; one message naming the key)
  unknown keys, unknown tasks / methods (with close matches), out-of-range
  hyperparameters, k larger than the number of held-in tasks
      tests/test_config.py::test_bad_config_names_the_key           (the checks)
      test_workflow_rejects_bad_config                               (snakemake -n --configfile)
  merge YAML of `mergescale merge` (unknown keys, methods, hyperparameters, dtype)
      tests/test_merge_cli.py::test_config_errors_name_the_key, ::test_cli_error_is_one_line

Checkpoints (non-zero exit, message naming file and tensor, no output directory left;
the CLI turns every such error into exit status 2: test_merge_cli.py::test_cli_error_is_one_line)
  architecture mismatch          tests/test_merge_engine.py::test_config_mismatch_named
  shape mismatch                 tests/test_merge_engine.py::test_shape_mismatch_names_tensor_and_both_files
  dtype mismatch                 tests/test_merge_engine.py::test_dtype_mismatch_named
  tensor missing in one expert   tests/test_merge_engine.py::test_missing_tensor_named
  NaN / Inf values               tests/test_merge_engine.py::test_nan_in_input_named_and_nothing_left
  truncated / corrupted shard    tests/test_merge_engine.py::test_truncated_shard_named, ::test_corrupt_header_named
  pickle-only checkpoint         tests/test_merge_engine.py::test_pickle_refused_unless_allowed
  vocabulary size mismatch       test_vocabulary_size_mismatch_says_what_to_do,
                                 test_architecture_difference_reported_before_vocabulary,
                                 tests/test_merge_engine.py::test_vocabulary_rows_recognised_by_config_vocab_size
  directory without weights      test_directory_without_weights
  trust_remote_code stays off    test_remote_code_never_runs_when_merging,
                                 test_remote_code_never_runs_when_loading,
                                 test_remote_code_never_runs_when_evaluating

Faults
  SIGKILL during training, evaluation   tests/test_faults.py (slow: the smoke workflow)
  SIGKILL during a merge                test_killed_merge_leaves_nothing_finished_and_rerun_matches
  disk full while writing a merge       test_disk_full_while_writing_merge
  a failed re-run keeps finished work   test_atomic_directory_keeps_finished_work

Determinism (same config and seeds: bit-identical merges, identical scores)
  tests/test_merge_engine.py::test_same_seed_gives_identical_bytes, tests/test_faults.py,
  test_killed_merge_leaves_nothing_finished_and_rerun_matches (across processes)
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge_fixtures import save_tiny_llama, tiny_llama_config
from mergescale.cli import main
from workflow_helpers import SMOKE_CONFIG, snakemake

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    base = save_tiny_llama(root / "base", 0)
    return {"base": base, "a": save_tiny_llama(root / "a", 1, like=base),
            "b": save_tiny_llama(root / "b", 2, like=base)}


def merge_yaml(path: Path, method: str, experts: list[Path], base: Path | None = None, **params) -> Path:
    config = {"merge_method": method, "models": [{"model": str(e)} for e in experts]}
    if base is not None:
        config["base_model"] = str(base)
    if params:
        config["parameters"] = params
    path.write_text(yaml.safe_dump(config))
    return path


def cli_error(capsys, *argv: str) -> str:
    """Run `mergescale merge ...`; expect exit status 2 and return the one-line error."""
    capsys.readouterr()  # drop what the test's own setup printed
    assert main(["merge", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergescale merge: error:"), err
    return err[0]


def nothing_left(out: Path) -> bool:
    """Neither the output directory nor a temporary of it remains."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def cli_subprocess(*argv: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "mergescale.cli", "merge", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# -- checkpoints ---------------------------------------------------------------------

def test_vocabulary_size_mismatch_says_what_to_do(models, tmp_path, capsys):
    # An expert whose tokenizer gained two tokens: 130 embedding and lm_head rows, not 128.
    bigger = save_tiny_llama(tmp_path / "bigger_vocab", 3, config=tiny_llama_config(vocab_size=130))
    out = tmp_path / "out"
    config = merge_yaml(tmp_path / "m.yaml", "ties", [models["a"], bigger], base=models["base"])
    err = cli_error(capsys, str(config), str(out))
    assert "vocabulary size mismatch in tensor" in err
    assert "'lm_head.weight'" in err or "'model.embed_tokens.weight'" in err
    assert "128 rows in " in err and "130 rows in " in err
    assert str(models["base"]) in err and str(bigger) in err
    assert "resize the embeddings of" in err and "same base" in err
    assert nothing_left(out)


def test_architecture_difference_reported_before_vocabulary(models, tmp_path, capsys):
    # Resizing embeddings would not help here: the message is about the MLP.
    other = save_tiny_llama(tmp_path / "other", 4, config=tiny_llama_config(vocab_size=130, intermediate_size=80))
    out = tmp_path / "out"
    err = cli_error(capsys, str(merge_yaml(tmp_path / "m.yaml", "linear", [models["a"], other])), str(out))
    assert re.search(r"tensor 'model.layers.\d.mlp.\w+.weight': shape \[(64, 32|32, 64)\] in .*/a/.* "
                     r"vs \[(80, 32|32, 80)\] in .*/other/", err), err
    assert "vocabulary" not in err
    assert nothing_left(out)


@pytest.mark.parametrize("layout", ["config_only", "empty", "missing"])
def test_directory_without_weights(models, tmp_path, capsys, layout):
    weightless = tmp_path / "weightless"
    if layout != "missing":
        weightless.mkdir()
    if layout == "config_only":
        (weightless / "config.json").write_text((models["a"] / "config.json").read_text())
    out = tmp_path / "out"
    err = cli_error(capsys, str(merge_yaml(tmp_path / "m.yaml", "ties", [models["a"], weightless],
                                           base=models["base"])), str(out))
    assert str(weightless) in err
    expected = {
        "config_only": "no model weights (*.safetensors or pytorch_model.bin) found; it holds only config.json",
        "empty": "no model weights (*.safetensors or pytorch_model.bin) found; the directory is empty",
        "missing": "models[1].model: '" + str(weightless) + "' is not a local model directory",
    }[layout]
    assert expected in err
    assert nothing_left(out)


# -- untrusted code in checkpoints --------------------------------------------------

EVIL_PY = """
from pathlib import Path
Path({marker!r}).write_text("code from the checkpoint ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = {model_type!r}
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def make_evil_checkpoint(path: Path, model_type: str, tokenizer_class: str | None = None) -> Path:
    """A real tiny Llama whose config.json (and tokenizer_config.json) auto_map points at
    evil.py in the checkpoint, which writes `path.EXECUTED` if it is ever imported."""
    from mergescale.models.llama import TinyShape, new_llama, save_model
    from mergescale.tasks import ALPHABET
    from mergescale.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(ALPHABET)
    save_model(new_llama(TinyShape(32, 2, 4, 64), tokenizer, seed=0), tokenizer, path)
    (path / "evil.py").write_text(EVIL_PY.format(marker=str(marker_of(path)), model_type=model_type))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    if tokenizer_class:
        tok_config["tokenizer_class"] = tokenizer_class
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


def marker_of(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".EXECUTED")


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> dict[str, Path]:
    """llama: auto_map beside an architecture transformers implements (loads with its own
    class); custom: a model_type only evil.py defines; tokenizer: a tokenizer class only
    evil.py defines."""
    root = tmp_path_factory.mktemp("evil")
    return {
        "llama": make_evil_checkpoint(root / "llama", "llama"),
        "custom": make_evil_checkpoint(root / "custom", "evilformer"),
        "tokenizer": make_evil_checkpoint(root / "tokenizer", "llama", tokenizer_class="EvilTokenizer"),
    }


def test_evil_checkpoint_does_run_code_when_trusted(tmp_path):
    # The control: the fixture is not a dud. trust_remote_code=True imports evil.py.
    evil_dir = make_evil_checkpoint(tmp_path / "trusted", "evilformer")
    code = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(evil_dir)], check=True, env=env, capture_output=True)
    assert marker_of(evil_dir).exists()


def test_remote_code_never_runs_when_merging(evil, tmp_path, capsys):
    for kind, path in evil.items():
        out = tmp_path / f"merged_{kind}"
        twin = tmp_path / f"{kind}_twin"  # a model may be listed once: merge it with a copy
        shutil.copytree(path, twin)
        assert main(["merge", str(merge_yaml(tmp_path / f"{kind}.yaml", "linear", [path, twin])), str(out)]) == 0
        assert not (out / "evil.py").exists()  # code is never copied into a merge either
        assert not marker_of(path).exists() and not marker_of(twin).exists(), kind


def test_remote_code_never_runs_when_loading(evil):
    from mergescale.models.llama import load_model
    from mergescale.models.remote_code import RemoteCodeRefused

    model, _ = load_model(evil["llama"])  # transformers' own Llama class; auto_map ignored
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(RemoteCodeRefused, match=r"custom/config.json: model_type 'evilformer' is not "
                       r"implemented by transformers and auto_map points at code .*evil.EvilModel.*"
                       r"trust_remote_code stays off"):
        load_model(evil["custom"])
    with pytest.raises(RemoteCodeRefused, match=r"tokenizer/tokenizer_config.json: tokenizer_class "
                       r"'EvilTokenizer' is not implemented"):
        load_model(evil["tokenizer"])
    assert not any(marker_of(p).exists() for p in evil.values())


def test_remote_code_never_runs_when_evaluating(evil, tmp_path):
    from mergescale.evaluate.harness import EvalRequest, evaluate
    from mergescale.models.remote_code import RemoteCodeRefused
    from mergescale.tasks import make_splits, write_jsonl, write_task_yaml

    rows = make_splits("last_letter", {"train": 1, "validation": 1, "test": 4})["test"]
    write_jsonl(rows, tmp_path / "data" / "test.jsonl")
    write_task_yaml("last_letter", "test", tmp_path / "data" / "test.jsonl", tmp_path / "tasks" / "t.yaml")

    def request(kind: str) -> EvalRequest:
        return EvalRequest(model_dir=evil[kind], task_dir=tmp_path / "tasks",
                           tasks=(("last_letter", "test"),), batch_size=4)

    result = evaluate(request("llama"), log=lambda *_: None)  # real lm-eval, model loaded as Llama
    assert result["scores"][0]["n"] == 4
    for kind in ("custom", "tokenizer"):
        with pytest.raises(RemoteCodeRefused, match="mergescale never runs code from model files"):
            evaluate(request(kind), log=lambda *_: None)
    assert not any(marker_of(p).exists() for p in evil.values())


# -- faults --------------------------------------------------------------------------

def write_big_checkpoint(path: Path, seed: int, shards: int = 4, per_shard: int = 2) -> Path:
    """~100 MB of float32 in `shards` shards: big enough that a merge takes seconds."""
    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{s * per_shard + i}.weight": torch.randn(2048, 1536, generator=generator)
                   for i in range(per_shard)}
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def merged_files(out: Path) -> dict[str, bytes]:
    """Every file of a merge except the card, whose times differ from run to run."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name not in ("merge_card.json", "README.md")}


def test_killed_merge_leaves_nothing_finished_and_rerun_matches(tmp_path, capsys):
    inputs = [write_big_checkpoint(tmp_path / name, seed) for seed, name in enumerate(("base", "a", "b"))]
    config = merge_yaml(tmp_path / "ties.yaml", "ties", inputs[1:], base=inputs[0], density=0.2)
    out = tmp_path / "merged"

    proc = cli_subprocess(str(config), str(out), "--threads", "1")
    deadline = time.monotonic() + 300
    partial = None
    while partial is None:  # kill once the output shard is being written
        assert proc.poll() is None, f"merge ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "merge never started writing"
        shards = [p for p in tmp_path.glob(".merged.*.tmp/model.safetensors") if p.stat().st_size > 2**20]
        partial = shards[0] if shards else None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing that looks finished
    killed_size = partial.stat().st_size  # the half-written leftover, under a temporary name

    rerun = cli_subprocess(str(config), str(out), "--threads", "1")
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert not list(tmp_path.glob(".merged.*"))  # the killed run's leftovers are gone

    assert main(["merge", str(config), str(tmp_path / "uninterrupted"), "--threads", "1"]) == 0
    resumed, reference = merged_files(out), merged_files(tmp_path / "uninterrupted")
    assert set(resumed) == {"model.safetensors"} and resumed == reference  # bit-identical
    assert killed_size < len(reference["model.safetensors"])  # it was killed mid-write


def _limit_file_size(limit: int):
    def preexec() -> None:
        # Writing past RLIMIT_FSIZE raises SIGXFSZ, which kills by default; ignored, the
        # write fails with EFBIG, as a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_disk_full_while_writing_merge(models, tmp_path):
    out = tmp_path / "out"
    config = merge_yaml(tmp_path / "m.yaml", "ties", [models["a"], models["b"]], base=models["base"])
    # the merged float32 model.safetensors is ~110 kB; every other output file is smaller
    proc = cli_subprocess(str(config), str(out), preexec_fn=_limit_file_size(64 * 1024))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last == (f"mergescale merge: error: no space left / file too large while writing {out}/model.safetensors "
                    "(File too large); the merge was abandoned and its temporary files removed; free disk space "
                    "(or raise the quota / file size limit) and run again")
    assert nothing_left(out)  # no output directory, no truncated file under any name


# -- the workflow ------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda c: c["merge"].update(methodz={}), r"config key merge: .*'methodz' was unexpected"),
    (lambda c: c["merge"].update(ks=[2, 5]), r"config key merge.ks: k=5 experts asked for, but tasks.held_in has only 3"),
], ids=["unknown_key", "k_too_large"])
def test_workflow_rejects_bad_config(tmp_path, edit, message):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", config=path, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "results").exists()  # no job ran


def test_atomic_directory_keeps_finished_work(tmp_path):
    from mergescale.io_utils import atomic_directory

    out = tmp_path / "out"
    (tmp_path / ".out.deadbeef.tmp").mkdir()  # what a SIGKILLed attempt leaves
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed halfway")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # failed: nothing; stale: cleared

    with atomic_directory(out) as tmp:
        (tmp / "v1").write_text("1")
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        raise RuntimeError("a failed re-run")
    assert [p.name for p in out.iterdir()] == ["v1"]  # the finished version survives
    with atomic_directory(out) as tmp:
        (tmp / "v2").write_text("2")
    assert [p.name for p in out.iterdir()] == ["v2"] and not list(tmp_path.glob(".out.*"))
    with pytest.raises(FileExistsError, match="appeared while it was being written"), \
            atomic_directory(out, replace=False) as tmp:
        (tmp / "v3").write_text("3")
    assert [p.name for p in out.iterdir()] == ["v2"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
