"""Where the connector logs. Engine adapters pass their engine's logger to every part (vLLM
shows only what its own "vllm" loggers log); this one is the default."""

import logging

CONNECTOR_LOG = logging.getLogger("kvdepot.connector")
