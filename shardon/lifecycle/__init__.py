"""Model lifecycle: catalog, GPU inventory, placement, backend processes, eviction.

The gateway uses :class:`LifecycleManager` (see ``manager.py``); everything it does that blocks runs
on its own thread.
"""

from shardon.lifecycle.config import GpusConfig, LifecycleConfig, ModelConfig
from shardon.lifecycle.manager import (
    BackendEndpoint,
    InsufficientMemoryError,
    LifecycleManager,
    ModelLoadError,
)

__all__ = [
    "BackendEndpoint",
    "GpusConfig",
    "InsufficientMemoryError",
    "LifecycleConfig",
    "LifecycleManager",
    "ModelConfig",
    "ModelLoadError",
]
