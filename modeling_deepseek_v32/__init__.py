"""DeepSeek-V3.2 for 🤗 transformers: MLA + DSA sparse attention + DeepSeekMoE + MTP + block FP8.

Importing this package registers the classes with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` under
``model_type="deepseek_v32"`` (replacing transformers' native registration for this process), so an official
checkpoint directory loads into these classes.
"""

from .configuration import DeepseekV32Config

__all__ = ["DeepseekV32Config"]
