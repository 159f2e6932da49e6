"""vLLM general plugin: registers the short connector name ``KVDepotConnector``.

vLLM calls every ``vllm.general_plugins`` entry point in every process it starts (API server,
engine core, workers), possibly more than once per process, and its factory raises on a second
registration of a name: hence the guard. Importing this module must stay cheap and must not
import the connector itself (the factory loads it lazily when a config names it).
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.kvdepot")

CONNECTOR_NAME = "KVDepotConnector"
MODULE_PATH = "kvdepot.integrations.vllm"


def register() -> None:
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # vLLM without the V1 connector factory: nothing to register
        return
    registry = getattr(KVConnectorFactory, "_registry", {})
    if CONNECTOR_NAME in registry:
        return
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, CONNECTOR_NAME)
    except ValueError:
        pass  # registered meanwhile (another plugin path): the name is there, which is all we need
