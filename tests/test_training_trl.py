"""TRL on a tiny model with the tokenizer of the small model shipped with the package: ``SFTTrainer`` on padded text
and ``GRPOTrainer`` with a toy reward (group-relative advantages, KL to a frozen reference model)."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

import modeling_deepseek_v32
from modeling_deepseek_v32.testing_utils import random_model, tiny_config
from modeling_deepseek_v32.training import DeepseekV32BiasUpdateCallback, package_architectures, routers, routing_stats

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")



@pytest.fixture(scope="module")
def tokenizer():
    # Only the tokenizer files of the shipped model are used: its weights may be retrained at any time.
    return AutoTokenizer.from_pretrained(modeling_deepseek_v32.default_model_path())


def _model(tokenizer, seed: int = 0):
    config = tiny_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return random_model(config, seed)


def _common(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path / "out"), logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0, weight_decay=0.0,
    )  # fmt: skip


class _LoadRecorder(TrainerCallback):
    """Reads the routers' accumulated loads at each optimizer step, before the bias callback consumes them."""

    def __init__(self):
        self.loads: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.loads.append(routing_stats(model, accumulated=True).loads)


def test_sft_trainer_trains_on_padded_text_and_counts_only_real_tokens(tmp_path, tokenizer):
    # Lines of different lengths, so every batch is padded (right-padded by TRL's collator, with an attention mask).
    lines = [line for line in inspect.getsource(textwrap).splitlines() if len(line.strip()) > 8]
    dataset = datasets.Dataset.from_dict({"text": lines[:256]})
    model = _model(tokenizer)
    real_tokens: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: real_tokens.append(int(kwargs["attention_mask"].sum())), with_kwargs=True
    )
    recorder = _LoadRecorder()
    config = trl.SFTConfig(
        max_length=48, per_device_train_batch_size=8, max_steps=30, learning_rate=3e-3, lr_scheduler_type="constant",
        **_common(tmp_path),
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[recorder, DeepseekV32BiasUpdateCallback(gamma=1e-3)],
    )  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"SFT loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f} (mean of the last 5 steps)")
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    # Batches were padded, and each MoE router counted exactly the real tokens of the step, top_k slots each.
    assert len(real_tokens) == len(recorder.loads) == 30
    padded = sum(1 for n in real_tokens if n < 8 * 48)
    assert padded > 0
    top_k = model.config.num_experts_per_tok
    for count, loads in zip(real_tokens, recorder.loads):
        assert loads and all(load.sum().item() == count * top_k for load in loads.values())


def test_grpo_trainer_with_group_relative_advantages_and_kl_to_reference(tmp_path, tokenizer):
    # GRPO builds its reference model from the policy's path, so the policy is saved first.
    path = tmp_path / "policy"
    model = _model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    biases = {name: router.e_score_correction_bias.clone() for name, router in routers(model).items()}
    half = len(tokenizer) // 2
    scored: list[list[float]] = []

    def low_ids(completion_ids, **kwargs) -> list[float]:
        """Toy reward: share of the completion's tokens in the lower half of the vocabulary."""
        rewards = [sum(t < half for t in ids) / max(1, len(ids)) for ids in completion_ids]
        scored.append(rewards)
        return rewards

    prompts = datasets.Dataset.from_dict({"prompt": ["def f(x):", "import os", "class A:", "for i in"] * 8})
    generations, steps = 4, 6
    config = trl.GRPOConfig(
        per_device_train_batch_size=8, num_generations=generations, max_completion_length=8, max_steps=steps,
        learning_rate=1e-2, lr_scheduler_type="constant", beta=0.1, temperature=1.0, **_common(tmp_path),
    )  # fmt: skip
    # TRL resolves `config.architectures` in the transformers namespace (transformers' own DeepSeek-V3.2); inside
    # package_architectures() it gets this package's classes, for the policy path and the reference model alike.
    with package_architectures():
        trainer = trl.GRPOTrainer(
            model=str(path), reward_funcs=low_ids, args=config, train_dataset=prompts, processing_class=tokenizer,
            callbacks=[DeepseekV32BiasUpdateCallback(gamma=1e-2)],
        )  # fmt: skip
    policy, reference = trainer.model, trainer.ref_model
    assert isinstance(policy, modeling_deepseek_v32.DeepseekV32ForCausalLM)
    assert isinstance(reference, modeling_deepseek_v32.DeepseekV32ForCausalLM)
    advantages: list[torch.Tensor] = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(*args, **kwargs):
        output = generate_and_score(*args, **kwargs)
        advantages.append(output["advantages"].detach().clone())
        return output

    trainer._generate_and_score_completions = recording
    trainer.train()

    # Group-relative advantages, recomputed from the rewards: (r - group mean) / (group std + 1e-4), per prompt.
    assert len(advantages) == len(scored) == steps
    for rewards, advantage in zip(scored, advantages):
        grouped = torch.tensor(rewards).view(-1, generations)
        expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        torch.testing.assert_close(advantage, expected.flatten(), rtol=1e-4, atol=1e-5)
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == steps
    # Before the first update the policy is the reference (KL 0); afterwards they differ and the reference stays put.
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(entry["kl"] > 0 for entry in logs[1:])
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    for name, param in reference.named_parameters():
        assert torch.equal(param, initial[name]), name
    assert any(not torch.equal(p, initial[n]) for n, p in policy.named_parameters() if n.startswith("model.layers"))
    assert any(not torch.equal(r.e_score_correction_bias, biases[n]) for n, r in routers(policy).items())
    print("GRPO reward per step:", [round(entry["reward"], 3) for entry in logs], "KL:", [round(e["kl"], 4) for e in logs])


def test_trl_loads_transformers_native_class_unless_told_otherwise(tmp_path, tokenizer):
    """Pins the pitfall that ``package_architectures`` exists for, and that the context leaves no trace."""
    import transformers
    from trl.trainer.utils import create_model_from_path

    native = transformers.DeepseekV32ForCausalLM
    _model(tokenizer).save_pretrained(tmp_path)
    assert not isinstance(create_model_from_path(str(tmp_path)), modeling_deepseek_v32.DeepseekV32ForCausalLM)
    with package_architectures():
        assert isinstance(create_model_from_path(str(tmp_path)), modeling_deepseek_v32.DeepseekV32ForCausalLM)
    assert transformers.DeepseekV32ForCausalLM is native
