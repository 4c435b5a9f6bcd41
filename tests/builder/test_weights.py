"""``--weights PATH``: a state dict that does not fit the architecture is refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the builder extra (torch) is not installed")

from builder.sources import load_weights  # noqa: E402
from engines.errors import BuildError  # noqa: E402


def _net() -> Any:  # a torch.nn.Module (torch is imported only where installed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))


def _save(state: object, tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path


def test_a_matching_state_dict_loads_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _net()
    target = _net()
    load_weights(target, _save(source.state_dict(), tmp_path), "net")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_num_batches_tracked_may_be_absent(tmp_path: Path) -> None:
    state = {k: v for k, v in _net().state_dict().items() if "num_batches" not in k}
    load_weights(_net(), _save(state, tmp_path), "net")


def test_missing_keys_are_refused_by_name(tmp_path: Path) -> None:
    state = _net().state_dict()
    del state["0.weight"], state["1.running_mean"]
    with pytest.raises(BuildError, match=r"2 missing keys \(0.weight, 1.running_mean\)"):
        load_weights(_net(), _save(state, tmp_path), "net")


def test_unexpected_keys_are_refused_by_name(tmp_path: Path) -> None:
    state = _net().state_dict()
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(BuildError, match=r"does not match the net architecture: 1 unexpected "
                                         r"keys \(head.weight\)"):
        load_weights(_net(), _save(state, tmp_path), "net")


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    state = _net().state_dict()
    state["3.weight"] = torch.zeros(5, 4)
    with pytest.raises(BuildError, match=r"does not match the net architecture.*3\.weight"):
        load_weights(_net(), _save(state, tmp_path), "net")


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="holds a list, not a state dict"):
        load_weights(_net(), _save([1, 2], tmp_path), "net")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(BuildError, match="cannot read it as a PyTorch state dict"):
        load_weights(_net(), garbage, "net")
