"""QLoRA: bitsandbytes 4-bit base weights, routed experts included, with LoRA adapters on attention and experts.

This package keeps every routed expert a plain ``nn.Linear`` (transformers' native DeepSeek fuses them into 3-D
parameters that bitsandbytes cannot quantize), so ``BitsAndBytesConfig(load_in_4bit=True)`` quantizes the experts,
which hold almost all of a DeepSeek model's weights. Skipped without CUDA and bitsandbytes; run through the device
tool (see README).
"""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import modeling_deepseek_v32
from modeling_deepseek_v32.training import (
    DeepseekV32BiasUpdateCallback,
    get_lora_model,
    lora_target_modules,
    qlora_config,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _quantized_fraction(model, bnb, pattern: str) -> tuple[float, int]:
    """Share of the weight elements of linears whose name contains ``pattern`` that are stored in 4 bits, and the
    number of such linears. A 4-bit ``Params4bit`` packs two values a byte, so elements are counted from its
    ``quant_state.shape``."""
    total = quantized = count = 0
    for name, module in model.named_modules():
        if pattern not in name or not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        count += 1
        weight = module.weight
        if isinstance(weight, bnb.nn.Params4bit):
            elements = weight.quant_state.shape.numel()
            quantized += elements
        else:
            elements = weight.numel()
        total += elements
    return quantized / max(1, total), count


def run_qlora(tmp_path, device: str = "cuda", steps: int = 30) -> dict:
    """Load a saved model in 4 bits, attach LoRA, train ``steps`` steps and generate. Returns the measured figures.
    Shared with scripts that check the same on other devices."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import Trainer, TrainingArguments

    # The small trained model shipped with the package: fine-tuning it on a stdlib source must lower its loss
    # (a random base under a frozen random lm_head barely moves with low-rank adapters).
    path = modeling_deepseek_v32.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device})
    memory_bf16 = full.get_memory_footprint()
    config = full.config
    del full
    # NF4 + double quantization + bf16 compute; kv_b_proj and the indexer's weights_proj (their weights are read
    # directly, not through the module) and lm_head stay unquantized.
    quantization = qlora_config()
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
    )
    assert isinstance(model, modeling_deepseek_v32.DeepseekV32ForCausalLM)
    expert_fraction, expert_linears = _quantized_fraction(model, bnb, ".mlp.experts.")
    attention_fraction, _ = _quantized_fraction(model, bnb, ".self_attn.")
    moe_layers = config.num_hidden_layers + config.num_nextn_predict_layers - config.first_k_dense_replace
    assert expert_linears == 3 * config.n_routed_experts * moe_layers
    assert expert_fraction == 1.0  # every routed expert's gate/up/down projection is 4-bit
    memory = model.get_memory_footprint()

    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_target_modules())
    model = get_lora_model(model, lora)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sum(".mlp.experts." in n for n in wrapped) == expert_linears  # adapters on the 4-bit experts
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    text = inspect.getsource(textwrap)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = 64
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=steps, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
        bf16=device == "cuda", use_cpu=device == "cpu", weight_decay=0.0, gradient_checkpointing=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[DeepseekV32BiasUpdateCallback(1e-3)])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    model.eval()
    prompt = tokenizer(["def wrap(text"], return_tensors="pt", add_special_tokens=False).to(device)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        # Greedy decoding through the cache must pick what a full forward of the result picks at each position.
        logits = model(generated).logits
    start = prompt["input_ids"].shape[1]
    agree = (logits[0, start - 1 : -1].argmax(-1) == generated[0, start:]).float().mean().item()
    return {
        "expert_fraction": expert_fraction, "attention_fraction": attention_fraction, "memory_bytes": memory, "memory_bytes_bf16": memory_bf16,
        "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]), "new_tokens": generated.shape[1] - start,
        "greedy_agreement": agree, "text": tokenizer.decode(generated[0]),
    }  # fmt: skip


def test_qlora_quantizes_experts_trains_and_generates(tmp_path):
    result = run_qlora(tmp_path)
    print(result)
    assert result["last_loss"] < result["first_loss"] - 0.3
    assert result["new_tokens"] == 12
    assert result["greedy_agreement"] >= 0.75  # bf16 4-bit matmuls: a near-tie may flip, most must agree
