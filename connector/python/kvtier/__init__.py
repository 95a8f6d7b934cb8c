"""kvtier: the vLLM KV connector that keeps agent conversations' KV in the node's DRAM and
NVMe tiers. vLLM loads it with

    --kv-transfer-config '{"kv_connector": "KvtierConnector",
                           "kv_connector_module_path": "kvtier.connector",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"agent_socket": "/run/kvtier/agent.sock"}}'

(the kvtier operator sets this for `cache.strategy: tiered`).
"""

from kvtier import _native

__version__ = _native.__version__
__all__ = ["__version__"]
