# syntax=docker/dockerfile:1
#
# vLLM with the kvdepot connector installed. The connector registers itself through vLLM's
# plugin entry point (vllm.general_plugins), so vLLM needs no patch: pass
#   --kv-transfer-config '{"kv_connector":"KVDepotConnector","kv_role":"kv_both",
#                          "kv_connector_extra_config":{"kvdepot.host":"<node ip>","kvdepot.port":5555}}'
#
# Build from the repository root:
#   docker build -f deploy/docker/vllm.Dockerfile -t kvdepot-vllm:0.1.0 .
# By default kvdepot is installed from this source tree, so the engines and the server image
# built from the same commit speak the same protocol version. To install a published release
# instead: --build-arg KVDEPOT_SPEC=kvdepot==0.1.0

# Any vLLM release from v0.26.0 on has the KV-connector API the connector implements.
ARG VLLM_VERSION=v0.33.0
FROM vllm/vllm-openai:${VLLM_VERSION}

ARG KVDEPOT_SPEC=/tmp/kvdepot
COPY . /tmp/kvdepot
# No extras: torch, pyzmq, msgspec and numpy already come with vLLM, and pip leaves installed
# requirements that satisfy kvdepot's pins alone (no second torch).
RUN python3 -m pip install --no-cache-dir "${KVDEPOT_SPEC}" \
 && rm -rf /tmp/kvdepot \
 && python3 -c "import kvdepot; print('kvdepot', kvdepot.__version__, 'installed')"

# Keys are BLAKE2b digests of the token ids, not Python's hash(): unlike LMCache's multi-process
# mode, no PYTHONHASHSEED is needed for engines to share chunks.
