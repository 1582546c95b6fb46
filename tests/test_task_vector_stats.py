import math

import pytest
import torch
from safetensors.torch import save_file

from mergescale.merge.task_vectors import stats_markdown, task_vector_stats


def _write(path, tensors):
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))


def test_relative_norms_and_cosines_known_answer(tmp_path):
    base = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([[4.0, 0.0]])}  # norm 5
    _write(tmp_path / "base", base)
    _write(tmp_path / "x", {"a": base["a"] + torch.tensor([1.0, 0, 0]), "b": base["b"]})
    _write(tmp_path / "y", {"a": base["a"] + torch.tensor([0, 2.0, 0]), "b": base["b"]})
    _write(tmp_path / "z", {"a": base["a"] + torch.tensor([1.0, 1.0, 0]), "b": base["b"]})
    stats = task_vector_stats(tmp_path / "base", {t: tmp_path / t for t in "xyz"})
    assert stats["base_norm"] == pytest.approx(5.0)
    assert stats["experts"]["y"]["relative_norm"] == pytest.approx(2 / 5)
    assert stats["cosine"]["x|y"] == pytest.approx(0.0)
    assert stats["cosine"]["x|z"] == pytest.approx(1 / math.sqrt(2))
    table = stats_markdown({"base": stats})
    assert "relative_norm_mean" in table and "| base | y | 0.4 |" in table


def test_missing_tensor_names_the_expert(tmp_path):
    _write(tmp_path / "base", {"a": torch.ones(2), "b": torch.ones(2)})
    _write(tmp_path / "x", {"a": torch.ones(2)})
    with pytest.raises(ValueError, match=r"expert .*x: tensor b"):
        task_vector_stats(tmp_path / "base", {"x": tmp_path / "x"})
