"""Integrations of kvdepot with inference engines (vLLM: kvdepot.integrations.vllm)."""
