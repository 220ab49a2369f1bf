"""Byte-level safetensors I/O and the safety rules every conversion relies on: clear errors for truncated or corrupt
shards, streamed writing, atomic files, resume of interrupted runs, disk-space check, inputs never touched."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_deepseek_v32.conversion import output as output_module
from modeling_deepseek_v32.conversion.checkpoint import Checkpoint
from modeling_deepseek_v32.conversion.output import (
    MARKER_NAME,
    OutputFile,
    parse_size,
    plan_hf_shards,
    write_checkpoint,
)
from modeling_deepseek_v32.conversion.shards import CheckpointError, TensorPlan, read_header, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.fp8": (torch.randn(4, 6, generator=g) * 10).to(torch.float8_e4m3fn),
        "d.i64": torch.arange(5),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }


def _plans(tensors, counter=None) -> list[TensorPlan]:
    def produce(name):
        if counter is not None:
            counter.append(name)
        return tensors[name]

    return [TensorPlan(n, t.dtype, tuple(t.shape), lambda n=n: produce(n)) for n, t in tensors.items()]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "x.safetensors", _plans(tensors))
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert _same(loaded[name], tensor), name
    assert not list(tmp_path.glob("*.tmp"))


def test_wrong_produced_shape_is_an_error_and_leaves_no_file(tmp_path):
    plan = TensorPlan("w", torch.float32, (2, 2), lambda: torch.zeros(3, 2))
    with pytest.raises(CheckpointError, match=r"'w'.*\[3, 2\].*\[2, 2\]"):
        write_safetensors(tmp_path / "x.safetensors", [plan])
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{path}.*truncated"):
        Checkpoint(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=rf"{path}.*not a safetensors file"):
        read_header(path)


def test_corrupt_header_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, path)
    data = bytearray(path.read_bytes())
    data[10:14] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt safetensors header"):
        Checkpoint(tmp_path)
    # a header whose length field points past the end of the file
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt or truncated"):
        Checkpoint(tmp_path)


def test_index_that_names_a_missing_shard_is_an_error(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: missing shard file"):
        Checkpoint(tmp_path)


def test_shard_planning_respects_the_size_limit():
    plans = [TensorPlan(f"t{i}", torch.float32, (250,), lambda: None) for i in range(10)]  # 1000 bytes each
    files = plan_hf_shards(plans, "2500B")
    assert [len(f.tensors) for f in files] == [2, 2, 2, 2, 2]
    assert files[0].filename == "model-00001-of-00005.safetensors"
    assert [f.filename for f in plan_hf_shards(plans, "1GB")] == ["model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size("300KB") == 300_000


def _job_files(tensors, counter=None) -> list[OutputFile]:
    plans = _plans(tensors, counter)
    return [OutputFile("model-00001-of-00003.safetensors", plans[:2]), OutputFile("model-00002-of-00003.safetensors", plans[2:4]),
            OutputFile("model-00003-of-00003.safetensors", plans[4:])]  # fmt: skip


def test_interrupted_run_leaves_no_half_written_file_and_resumes(tmp_path):
    tensors = _tensors()
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    job = {"command": "test", "inputs": [1]}

    def interrupting():
        raise KeyboardInterrupt

    files = _job_files(tensors)
    files[1].tensors[1] = TensorPlan("d.i64", torch.int64, (5,), interrupting)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, files, job=job, inputs=[src], side_files={"config.json": b"{}"}, progress=False)
    names = sorted(p.name for p in out.iterdir())
    # the first file is complete, the second never reached its final name, nothing else was written
    assert names == [MARKER_NAME, "model-00001-of-00003.safetensors"]
    first = out / "model-00001-of-00003.safetensors"
    before = (first.stat().st_ino, first.stat().st_mtime_ns)

    produced = []
    write_checkpoint(out, _job_files(tensors, produced), job=job, inputs=[src], side_files={"config.json": b"{}"}, progress=False)
    assert produced == ["c.fp8", "d.i64", "e.bool", "f.scalar", "g.empty"]  # the finished file was skipped
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == before
    assert not (out / MARKER_NAME).exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["c.fp8"] == "model-00002-of-00003.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    ckpt = Checkpoint(out)
    for name, tensor in tensors.items():
        assert _same(ckpt.get(name), tensor), name


def test_resume_refuses_a_different_job_and_a_finished_directory_needs_overwrite(tmp_path):
    tensors = _tensors()
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()

    def fail():
        raise RuntimeError("stop")

    files = _job_files(tensors)
    files[2].tensors[0] = TensorPlan("e.bool", torch.bool, (3,), fail)
    with pytest.raises(RuntimeError):
        write_checkpoint(out, files, job={"v": 1}, inputs=[src], progress=False)
    with pytest.raises(CheckpointError, match="unfinished conversion with different settings"):
        write_checkpoint(out, _job_files(tensors), job={"v": 2}, inputs=[src], progress=False)
    produced = []
    write_checkpoint(out, _job_files(tensors, produced), job={"v": 2}, inputs=[src], overwrite=True, progress=False)
    assert len(produced) == len(tensors)  # --overwrite starts over instead of reusing files of another job
    with pytest.raises(CheckpointError, match="not empty"):
        write_checkpoint(out, _job_files(tensors), job={"v": 2}, inputs=[src], progress=False)


def test_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()

    class Usage:
        free = 100

    monkeypatch.setattr(output_module.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(CheckpointError, match=r"not enough disk space in .*out.*only 100 B free"):
        write_checkpoint(out, _job_files(_tensors()), job={}, inputs=[src], progress=False)
    assert not list(out.glob("*.safetensors"))


def test_output_may_not_overlap_an_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for target in (src, src / "converted", tmp_path):
        with pytest.raises(CheckpointError, match="overlaps input directory"):
            write_checkpoint(target, _job_files(_tensors()), job={}, inputs=[src], progress=False)
    assert list(src.iterdir()) == []
