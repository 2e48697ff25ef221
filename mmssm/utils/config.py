"""Config helpers shared by the tools."""
from typing import Any


def replace_sync_bn(node: Any) -> None:
    """Turn SyncBN norm configs into BN, in place (SyncBN needs CUDA and a process group)."""
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
        for v in node.values():
            replace_sync_bn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            replace_sync_bn(v)
