"""Indexer training under bf16 autocast (how scripts/train_nano.py and Trainer(bf16=True) run it)."""

from __future__ import annotations

import pytest
import torch

from modeling_deepseek_v32.testing_utils import random_model, tiny_config


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_indexer_loss_trains_under_bf16_autocast(stage):
    torch.manual_seed(0)
    model = random_model(tiny_config(mtp_loss_weight=0.3)).train()
    model.config.indexer_training = stage
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.indexer_loss is not None and torch.isfinite(out.indexer_loss)
    grad = model.model.layers[0].self_attn.indexer.wq_b.weight.grad
    assert grad is not None and grad.abs().sum() > 0
