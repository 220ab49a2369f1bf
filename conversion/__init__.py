"""Checkpoint conversion tools land here (installed as ``modeling_deepseek_v32.conversion``)."""
