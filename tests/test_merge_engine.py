"""The streaming engine on tiny random Llamas: output, determinism, input validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_fixtures import load_state, save_tiny_llama, tiny_llama_config
from mergescale.merge import MergeInputError, MergeRequest, run_merge


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_llama(root / "base", 0)
    return {
        "base": base,
        "e1": save_tiny_llama(root / "e1", 1, like=base),
        "e2": save_tiny_llama(root / "e2", 2, like=base),
    }


@pytest.fixture
def copy_of(models, tmp_path):
    """A writable copy of one fixture model, to break on purpose."""

    def make(key: str) -> Path:
        dst = tmp_path / f"{key}_copy"
        shutil.copytree(models[key], dst)
        return dst

    return make


def leftovers(parent: Path, out: Path) -> list[str]:
    """Anything the failed merge left next to where its output would have gone."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}") or p == out)


def test_ties_output_loads_and_is_sharded(models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = run_merge(MergeRequest(
        method="ties", base=models["base"], experts=[models["e1"], models["e2"]], out_dir=out,
        params={"density": 0.5}, dtype="bfloat16", max_shard_bytes=20_000,
    ))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file()
    card = json.loads((out / "merge_card.json").read_text())
    assert card == result.card
    assert card["method"] == "ties" and card["experts"][0]["params"]["density"] == 0.5
    assert card["versions"]["torch"] and card["peak_rss_bytes"] > 0 and card["wall_time_s"] >= 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".merged*"))


def test_ties_matches_per_tensor_reference(models, tmp_path):
    from mergescale.merge import get_method

    out = tmp_path / "merged"
    run_merge(MergeRequest(method="ties", base=models["base"], experts=[models["e1"], models["e2"]],
                           out_dir=out, params={"density": 0.3}))
    merged = load_state(out)
    base, e1, e2 = (load_state(models[k]) for k in ("base", "e1", "e2"))
    fn = get_method("ties").function
    p = [{"weight": 1.0, "density": 0.3}] * 2
    g = {"lambda": 1.0, "normalize": True, "rescale": False}
    assert set(merged) == set(base)
    for name in base:
        assert torch.equal(merged[name], fn(base[name], [e1[name], e2[name]], p, g, None, name))


def test_linear_of_identical_experts_is_the_expert(models, tmp_path):
    out = tmp_path / "soup"
    run_merge(MergeRequest(method="linear", experts=[models["e1"]] * 2, out_dir=out))
    merged, expert = load_state(out), load_state(models["e1"])
    assert merged.keys() == expert.keys()
    assert all(torch.equal(merged[k], expert[k]) for k in expert)  # (x + x) / 2 is exact
    assert (out / "model.safetensors").is_file()  # one shard under the 5 GB default
    # three copies: (x + x + x) / 3 rounds in float32
    run_merge(MergeRequest(method="linear", experts=[models["e1"]] * 3, out_dir=tmp_path / "soup3"))
    merged = load_state(tmp_path / "soup3")
    for k in expert:
        torch.testing.assert_close(merged[k], expert[k], rtol=1e-6, atol=0)


def test_same_seed_gives_identical_bytes(models, tmp_path):
    def merge(seed: int, name: str, prefetch: bool) -> dict[str, bytes]:
        out = tmp_path / name
        run_merge(MergeRequest(method="dare_ties", base=models["base"], experts=[models["e1"], models["e2"]],
                               out_dir=out, params={"density": 0.5}, seed=seed, prefetch=prefetch,
                               max_shard_bytes=50_000))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    a, b, c = merge(7, "a", True), merge(7, "b", False), merge(8, "c", True)
    assert a == b
    assert a != c


def test_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    req = dict(method="linear", experts=[models["e1"]], out_dir=out)
    with pytest.raises(MergeInputError, match="already exists"):
        run_merge(MergeRequest(**req))
    run_merge(MergeRequest(**req, overwrite=True))
    assert (out / "model.safetensors").is_file()


def _merge_err(tmp_path, base, experts, match, method="ties", **kw):
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=match):
        run_merge(MergeRequest(method=method, base=base, experts=experts, out_dir=out, **kw))
    assert leftovers(tmp_path, out) == []


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


EMBED = "model.embed_tokens.weight"


def test_missing_tensor_named(models, copy_of, tmp_path):
    bad = copy_of("e2")
    shard = _shard_of(bad, EMBED)
    _rewrite(shard, lambda t: t.pop(EMBED))
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][EMBED]
    index_path.write_text(json.dumps(index))
    _merge_err(tmp_path, models["base"], [models["e1"], bad], rf"{EMBED}.*missing from .*e2_copy")


def test_shape_mismatch_names_tensor_and_both_files(models, tmp_path):
    other = save_tiny_llama(tmp_path / "wide", 3, config=tiny_llama_config(intermediate_size=80))
    _merge_err(tmp_path, models["base"], [models["e1"], other], r"'model.layers.0.mlp.*shape \[64, 32\] in .*base.* vs \[80, 32\] in .*wide")


def test_mixed_float_dtypes_compute_in_float32(models, tmp_path):
    """A bf16 expert on a float32 base merges as its float32 copy would; the output
    keeps the base's dtype unless one is asked for."""
    half = save_tiny_llama(tmp_path / "half", 4, like=models["base"], dtype=torch.bfloat16)
    widened = tmp_path / "widened"
    shutil.copytree(half, widened)
    for shard in widened.glob("*.safetensors"):
        _rewrite(shard, lambda t: t.update({k: v.float() for k, v in t.items()}))
    outs = {}
    for label, expert in (("mixed", half), ("f32", widened)):
        outs[label] = tmp_path / label
        run_merge(MergeRequest(method="ties", base=models["base"], experts=[models["e1"], expert],
                               out_dir=outs[label], params={"density": 0.5}))
    a, b = load_state(outs["mixed"]), load_state(outs["f32"])
    assert all(v.dtype == torch.float32 for v in a.values())
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    run_merge(MergeRequest(method="ties", base=models["base"], experts=[models["e1"], half],
                           out_dir=tmp_path / "bf16", params={"density": 0.5}, dtype="bfloat16"))
    assert all(v.dtype == torch.bfloat16 for v in load_state(tmp_path / "bf16").values())


def test_integer_tensor_where_a_float_is_expected_named(models, copy_of, tmp_path):
    bad = copy_of("e1")
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(_shard_of(bad, name), lambda t: t.update({name: t[name].round().to(torch.int64)}))
    _merge_err(tmp_path, models["base"], [bad, models["e2"]],
               rf"tensor '{name}': dtype torch.float32 in .*base.* cannot be merged with torch.int64 in .*e1_copy")


def test_nan_in_input_named_and_nothing_left(models, copy_of, tmp_path):
    bad = copy_of("e1")
    name = "model.layers.1.mlp.down_proj.weight"  # late in the stream: output already being written
    shard = _shard_of(bad, name)

    def poison(t):
        t[name][0, 0] = float("nan")

    _rewrite(shard, poison)
    _merge_err(tmp_path, models["base"], [bad, models["e2"]], rf"'{name}' in .*e1_copy.*{shard.name}.*NaN")


def test_truncated_shard_named(models, copy_of, tmp_path):
    bad = copy_of("e1")
    shard = _shard_of(bad, EMBED)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _merge_err(tmp_path, models["base"], [bad, models["e2"]], rf"{shard.name}: truncated")


def test_corrupt_header_named(models, copy_of, tmp_path):
    bad = copy_of("e1")
    shard = _shard_of(bad, EMBED)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    _merge_err(tmp_path, models["base"], [bad, models["e2"]], rf"{shard.name}: corrupt")


def test_config_mismatch_named(models, copy_of, tmp_path):
    bad = copy_of("e1")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(config))
    _merge_err(tmp_path, models["base"], [bad, models["e2"]], r"model_type differs: 'llama' in .*base.*'mistral' in .*e1_copy")


def _pickle_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(load_state(src), dst / "pytorch_model.bin")
    return dst


def test_pickle_refused_unless_allowed(models, tmp_path):
    pickled = _pickle_only(models["e1"], tmp_path / "pickled")
    _merge_err(tmp_path, models["base"], [pickled, models["e2"]], r"pickled/pytorch_model.bin: pickle checkpoints are refused")
    out = tmp_path / "ok"
    run_merge(MergeRequest(method="ties", base=models["base"], experts=[pickled, models["e2"]],
                           out_dir=out, allow_pickle=True))
    ref = tmp_path / "ref"
    run_merge(MergeRequest(method="ties", base=models["base"], experts=[models["e1"], models["e2"]], out_dir=ref))
    a, b = load_state(out), load_state(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_request_errors(models, tmp_path):
    _merge_err(tmp_path, None, [models["e1"]], "ties needs a base model")
    _merge_err(tmp_path, models["base"], [models["e1"]], "densty", params={"densty": 0.1})
    _merge_err(tmp_path, models["base"], [tmp_path / "nowhere"], "nowhere: not a directory")
    _merge_err(tmp_path, models["base"], [models["e1"]], "dtype 'fp8'", dtype="fp8")
    empty = tmp_path / "empty"
    empty.mkdir()
    _merge_err(tmp_path, models["base"], [empty], "empty: no model weights")


def _raw_checkpoint(path: Path, rows: int, vocab_size: int | None) -> Path:
    path.mkdir()
    save_file({"tok.w": torch.zeros(rows, 8), "proj.w": torch.zeros(8, 8)}, path / "model.safetensors")
    if vocab_size is not None:
        (path / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return path


def test_vocabulary_rows_recognised_by_config_vocab_size(tmp_path):
    # A tensor name no pattern knows: its rows count as vocabulary because they equal
    # each config.json's vocab_size; without configs it is an ordinary shape mismatch.
    a, b = _raw_checkpoint(tmp_path / "a", 10, 10), _raw_checkpoint(tmp_path / "b", 12, 12)
    _merge_err(tmp_path, None, [a, b], r"vocabulary size mismatch in tensor 'tok.w': 10 rows in .*a/model"
               r".* vs 12 rows in .*b/model.*resize the embeddings of .*b to its 10-token vocabulary",
               method="linear")
    c, d = _raw_checkpoint(tmp_path / "c", 10, None), _raw_checkpoint(tmp_path / "d", 12, None)
    _merge_err(tmp_path, None, [c, d], r"tensor 'tok.w': shape \[10, 8\] in .*c/model.* vs \[12, 8\]",
               method="linear")


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("dare_linear", {"density": 0.5})])
def test_tensors_read_by_ranges_merge_to_the_same_bytes(models, tmp_path, monkeypatch, method, params):
    """Tensors above STREAM_BYTES are merged block by block from the files; the output
    is byte for byte that of merging them in memory."""
    from mergescale.merge import engine
    from mergescale.merge.methods import task_arithmetic

    def merge(name: str) -> dict[str, bytes]:
        out = tmp_path / name
        run_merge(MergeRequest(method=method, base=models["base"], experts=[models["e1"], models["e2"]],
                               out_dir=out, params=params, seed=3, dtype="bfloat16"))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    in_memory = merge("in_memory")
    monkeypatch.setattr(engine, "STREAM_BYTES", 0)
    monkeypatch.setattr(task_arithmetic, "READ_ELEMENTS", 1000)
    monkeypatch.setattr(task_arithmetic, "BLOCK_ELEMENTS", 256)
    assert merge("streamed") == in_memory


def test_nan_in_a_tensor_read_by_ranges_named(models, copy_of, tmp_path, monkeypatch):
    from mergescale.merge import engine

    monkeypatch.setattr(engine, "STREAM_BYTES", 0)
    bad = copy_of("e1")
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _shard_of(bad, name)

    def poison(t):
        t[name][0, 0] = float("nan")

    _rewrite(shard, poison)
    _merge_err(tmp_path, models["base"], [bad, models["e2"]], rf"'{name}' in .*e1_copy.*{shard.name}.*NaN")
