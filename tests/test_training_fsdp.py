"""FSDP2 on 2 CPU processes (gloo, real subprocesses through torchrun): sharding, training, sharded checkpoint
resume, and the same trajectory as one unsharded process on both ranks' data."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_deepseek_v32.training import keep_experts_in_graph, update_routing_bias

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_train.py"
STEPS, BATCH, SEQ = 4, 4, 32

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or shutil.which("torchrun") is None, reason="needs torch.distributed"
)


def _launch(output: Path, *extra: str) -> dict:
    command = ["torchrun", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--output", str(output),
               "--steps", str(STEPS), "--batch", str(BATCH), "--seq-len", str(SEQ), "--cpu", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-3000:]
    return json.loads(lines[-1])


def _example():
    spec = importlib.util.spec_from_file_location("fsdp2_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsdp2_shards_trains_and_resumes_like_one_unsharded_process(tmp_path):
    full = _launch(tmp_path / "full")
    first = _launch(tmp_path / "resumed", "--stop-after", "2")
    second = _launch(tmp_path / "resumed", "--resume")
    # Every parameter is sharded over the 2 ranks.
    assert full["world_size"] == 2 and full["sharded_tensors"] > 0
    assert full["local_param_elements"] <= full["full_param_elements"] // 2 + 64
    assert full["bias_spread_across_ranks"] == 0.0  # the router bias update is identical on every rank
    # Resuming from the sharded checkpoint (model, optimizer, router biases) continues exactly.
    assert second["start_step"] == 2 and first["losses"] + second["losses"] == pytest.approx(full["losses"], rel=1e-5)
    # Reference: one process, no sharding, AdamW on both ranks' rows at once (the mean gradient FSDP computes).
    example = _example()
    torch.manual_seed(0)
    model = example.build_model(None)
    keep_experts_in_graph(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        ids = example.global_batch(step, 2, BATCH, SEQ)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_routing_bias(model, 1e-3)
        losses.append(loss.item())
    print("FSDP2 losses", full["losses"], "unsharded", losses)
    assert full["losses"] == pytest.approx(losses, rel=2e-4)
    assert losses[-1] < losses[0] - 0.5
