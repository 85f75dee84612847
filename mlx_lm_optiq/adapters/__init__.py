"""Many LoRA adapters on one base model: mounting and selection (`mounting`), mixed-adapter
batch rows (`rows`), and the server's adapter state and HTTP admin API as plain functions
(`admin_api`). The script API is re-exported here:

    from mlx_lm_optiq.adapters import mount_adapter, use_adapter, adapter_rows
"""

from mlx_lm_optiq.adapters.mounting import (
    AdapterError,
    AdapterWeights,
    MountedAdapter,
    UnknownAdapterError,
    adapter_rows,
    mount_adapter,
    mounted_adapters,
    read_adapter,
    unmount_adapter,
    use_adapter,
)

__all__ = [
    "AdapterError",
    "AdapterWeights",
    "MountedAdapter",
    "UnknownAdapterError",
    "adapter_rows",
    "mount_adapter",
    "mounted_adapters",
    "read_adapter",
    "unmount_adapter",
    "use_adapter",
]
