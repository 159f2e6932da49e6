"""kvdepot's KV connector for vLLM.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVDepotConnector", "kv_role": "kv_both"}'

works once kvdepot is installed (the ``vllm.general_plugins`` entry point registers the name);
``"kv_connector_module_path": "kvdepot.integrations.vllm"`` works without it. Server address:
``kv_connector_extra_config: {"kvdepot.host": ..., "kvdepot.port": ...}`` (LMCache's
``lmcache.mp.host`` / ``lmcache.mp.port`` are accepted too); see config.py for every key.
"""

from kvdepot.integrations.vllm.connector import KVDepotConnector

__all__ = ["KVDepotConnector"]
