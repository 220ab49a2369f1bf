"""DeepSeek-V3.2 for 🤗 transformers: MLA + DSA sparse attention + DeepSeekMoE + MTP + block FP8.

Importing this package registers the classes with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` under
``model_type="deepseek_v32"``. That replaces transformers' native registration for this process (``exist_ok=True``),
so an official checkpoint directory loads into these classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import DeepseekV32Cache
from .configuration import DeepseekV32Config
from .modeling_deepseek_v32 import (
    DeepseekV32ForCausalLM,
    DeepseekV32Model,
    DeepseekV32PreTrainedModel,
)

__all__ = [
    "default_model_path",
    "DeepseekV32Cache",
    "DeepseekV32Config",
    "DeepseekV32ForCausalLM",
    "DeepseekV32Model",
    "DeepseekV32PreTrainedModel",
]
__version__ = "0.1.0"


def default_model_path() -> str:
    """Directory of the small trained DeepSeek-V3.2 ("nano", Python-source domain) shipped inside the package:
    ``AutoModelForCausalLM.from_pretrained(default_model_path())`` works offline."""
    from importlib import resources

    return str(resources.files(__name__).joinpath("default_model"))


AutoConfig.register(DeepseekV32Config.model_type, DeepseekV32Config, exist_ok=True)
AutoModel.register(DeepseekV32Config, DeepseekV32Model, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV32Config, DeepseekV32ForCausalLM, exist_ok=True)
