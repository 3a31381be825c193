"""Streaming safetensors reading and sharded writing (checked with the safetensors library)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arm.merge.tensor_io import (
    INDEX_FILE,
    ModelFolder,
    OutTensor,
    ShardedWriter,
    TensorIOError,
    TensorReader,
    parse_size,
    plan_shards,
    publish,
    read_safetensors_header,
    st_dtype_of,
    temp_sibling,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (123, 123),
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5KB", 1500),
        ("77", 77),
    ],
)
def test_parse_size(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["5XB", "", "-1", 0, True, "GB"])
def test_parse_size_rejects(value: int | str) -> None:
    with pytest.raises(ValueError, match="shard size"):
        parse_size(value)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(10, 7, generator=gen),
        "b.weight": torch.randn(33, generator=gen).to(torch.bfloat16),
        "c.bias": torch.randn(4, 4, generator=gen).to(torch.float16),
        "d.ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "e.mask": torch.tensor([True, False, True]),
    }


def test_sharded_writer_round_trip_in_chunks(tmp_path: Path) -> None:
    tensors = _tensors()
    plan = [OutTensor(n, st_dtype_of(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, shard_size=200)
    for name, tensor in tensors.items():
        writer.begin(name)
        flat = tensor.reshape(-1)
        for s in range(0, flat.numel(), 5):  # in chunks
            writer.write(flat[s : s + 5])
    writer.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(writer.shards) > 1
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(tmp_path / shard))  # the safetensors library validates the files
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    # and our reader reads them back, whole and by ranges
    folder = ModelFolder(tmp_path)
    with TensorReader() as reader:
        for name, tensor in tensors.items():
            assert torch.equal(reader.read(folder.tensors[name]), tensor)
        part = torch.empty(4, dtype=torch.float32)
        reader.read_into(folder.tensors["a.weight"], 3, 4, part)
        assert torch.equal(part, tensors["a.weight"].reshape(-1)[3:7])


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [OutTensor("x", "F32", (3,))], shard_size=10**9)
    writer.write_tensor("x", torch.ones(3))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["x"], torch.ones(3))


def test_writer_refuses_out_of_plan_writes(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [OutTensor("x", "F32", (3,)), OutTensor("y", "F32", (1,))], 10**9)
    with pytest.raises(RuntimeError, match="expected tensor 'x'"):
        writer.begin("y")
    writer.begin("x")
    with pytest.raises(RuntimeError, match="too many bytes"):
        writer.write(torch.ones(4))
    writer.abort()


def test_plan_shards_greedy() -> None:
    plan = [OutTensor(str(i), "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(plan, shard_size=80)
    assert [[t.name for t in s.tensors] for s in shards] == [["0", "1"], ["2"], ["3", "4"]]
    assert shards[0].filename == "model-00001-of-00003.safetensors"


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(TensorIOError, match=r"model\.safetensors.*'w'.*truncated"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "content", [b"\x05", b"\xff" * 8 + b"{}", b"\x08\x00\x00\x00\x00\x00\x00\x00not json"]
)
def test_corrupt_header_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(TensorIOError, match="model.safetensors"):
        ModelFolder(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(TensorIOError, match="model-00002-of-00002.safetensors"):
        ModelFolder(tmp_path)


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(TensorIOError, match="no model.safetensors"):
        ModelFolder(tmp_path)


def test_temp_sibling_removes_leftovers_of_dead_processes(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    stale = tmp_path / ".merged.tmp-999999999-abcdef"  # no such pid
    live = tmp_path / f".merged.tmp-{os.getpid()}-abcdef"
    stale.mkdir()
    live.mkdir()
    tmp = temp_sibling(out)
    assert not stale.exists() and live.exists() and tmp.is_dir()
    (tmp / "f").write_text("x")
    publish(tmp, out, overwrite=False)
    assert (out / "f").read_text() == "x" and not tmp.exists()
    tmp2 = temp_sibling(out)
    with pytest.raises(FileExistsError, match="merge.overwrite"):
        publish(tmp2, out, overwrite=False)
    publish(tmp2, out, overwrite=True)
    assert not (out / "f").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "merged"]
