"""Tensor names and tensor-parallel splits of DeepSeek's inference-demo format, mapped to the official HF names.

DeepSeek's demo runtime (``inference/convert.py`` + ``model.py`` in their repo) uses short names and one file per
tensor-parallel rank, ``model{rank}-mp{N}.safetensors``. The rules, as documented in the project's reference notes:

* the ``model.`` prefix is dropped; ``self_attn`` -> ``attn``, ``mlp`` -> ``ffn``; ``weight_scale_inv`` -> ``scale``;
  the router's ``e_score_correction_bias`` -> ``bias``; module renames in :data:`HF_TO_DEMO_MODULE`;
  the indexer's own ``wq_b``/``wk``/``k_norm``/``weights_proj`` keep their names;
* routed experts are partitioned by index (rank r holds experts ``[r*E/N, (r+1)*E/N)``, under their global index);
* column-parallel weights (embedding, head, ``wq``/``wq_b``, ``wkv_b``, ``w1``, ``w3``) are split on dim 0 and
  row-parallel ones (``wo``, ``w2``) on dim 1, for the dense MLP and the shared experts alike; FP8 scales follow
  their weight's split;
* everything else is replicated on every rank; the MTP layer is not part of the format.

Both directions are pure functions of the name, tested to be inverse over every tensor of a model.
"""

from __future__ import annotations

import re

from .shards import CheckpointError

__all__ = ["HF_TO_DEMO_MODULE", "demo_to_hf_name", "hf_to_demo_name", "layer_index", "split_rule"]

HF_TO_DEMO_MODULE = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
}
_DEMO_TO_HF_MODULE = {v: k for k, v in HF_TO_DEMO_MODULE.items()}
_HF_CONTAINERS = {"self_attn": "attn", "mlp": "ffn"}
_DEMO_CONTAINERS = {v: k for k, v in _HF_CONTAINERS.items()}
_HF_TOP = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "head"}
_DEMO_TOP = {v: k for k, v in _HF_TOP.items()}
# Names that are the same in both formats.
_KEPT = {"experts", "shared_experts", "gate", "indexer", "wq_b", "wk", "k_norm", "weights_proj"}
_INDEXER_CHILDREN = {"wq_b", "wk", "k_norm", "weights_proj"}
_PARAMS = {"weight", "bias", "weight_scale_inv", "e_score_correction_bias"}

_COLUMN_PARALLEL = {"q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj"}
_ROW_PARALLEL = {"o_proj", "down_proj"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_index(hf_name: str) -> int | None:
    match = _LAYER.match(hf_name)
    return int(match.group(1)) if match else None


def _unknown(name: str, fmt: str) -> CheckpointError:
    return CheckpointError(f"tensor {name!r} has no counterpart in the {fmt} format (only the main decoder layers, embedding, norm and head are part of DeepSeek's demo format)")


def _map_segments(segments: list[str], containers: dict, modules: dict, name: str, target: str) -> list[str]:
    """Module path below ``layers.N`` in the other format. Inside the indexer, its children keep their names even
    where they collide with a main-attention rename (its ``wq_b`` is not the attention's ``q_b_proj``)."""
    out, in_indexer = [], False
    for segment in segments:
        if segment in containers:
            out.append(containers[segment])
        elif segment == "indexer":
            in_indexer = True
            out.append(segment)
        elif in_indexer and segment in _INDEXER_CHILDREN:
            out.append(segment)
        elif segment in modules:
            out.append(modules[segment])
        elif segment in _KEPT - _INDEXER_CHILDREN or segment.isdigit():
            out.append(segment)
        else:
            raise _unknown(name, target)
    return out


def hf_to_demo_name(name: str) -> str:
    """``model.layers.3.mlp.experts.7.gate_proj.weight_scale_inv`` -> ``layers.3.ffn.experts.7.w1.scale``."""
    *path, param = name.split(".")
    module = ".".join(path)
    if module in _HF_TOP:
        if param not in ("weight", "bias"):
            raise _unknown(name, "demo")
        return f"{_HF_TOP[module]}.{param}"
    if layer_index(name) is None or param not in _PARAMS:
        raise _unknown(name, "demo")
    out = ["layers", path[2], *_map_segments(path[3:], _HF_CONTAINERS, HF_TO_DEMO_MODULE, name, "demo")]
    if param == "weight_scale_inv":
        param = "scale"
    elif param == "e_score_correction_bias":
        if path[-1] != "gate":
            raise _unknown(name, "demo")
        param = "bias"
    return ".".join(out + [param])


def demo_to_hf_name(name: str) -> str:
    """Inverse of :func:`hf_to_demo_name`."""
    *path, param = name.split(".")
    module = ".".join(path)
    if module in _DEMO_TOP:
        return f"{_DEMO_TOP[module]}.{param}"
    if len(path) < 3 or path[0] != "layers" or not path[1].isdigit() or param not in ("weight", "bias", "scale"):
        raise _unknown(name, "Hugging Face")
    below = _map_segments(path[2:], _DEMO_CONTAINERS, _DEMO_TO_HF_MODULE, name, "Hugging Face")
    out = ["model", "layers", path[1], *below]
    if param == "scale":
        param = "weight_scale_inv"
    elif param == "bias" and path[-1] == "gate":
        param = "e_score_correction_bias"
    return ".".join(out + [param])


def split_rule(hf_name: str) -> tuple[str, int | None]:
    """How a tensor is laid out over ranks: ``("replicate", None)``, ``("split", dim)`` or ``("expert", index)``."""
    *path, _ = hf_name.split(".")
    module = ".".join(path)
    if module in ("model.embed_tokens", "lm_head"):
        return "split", 0
    if "indexer" in path or layer_index(hf_name) is None:
        return "replicate", None
    if len(path) >= 6 and path[4] == "experts" and path[5].isdigit():
        return "expert", int(path[5])
    leaf = path[-1]
    if leaf in _COLUMN_PARALLEL:
        return "split", 0
    if leaf in _ROW_PARALLEL:
        return "split", 1
    return "replicate", None
