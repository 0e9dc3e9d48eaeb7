"""The node registry, which every request reads: `_nodes_c` (compiled from ``_nodes_py.py``, typed by
``_nodes_c.pxd``) or ``_nodes_py.py`` itself, which says what it does. ``COMPILED`` tells which;
``SHARDON_NO_EXTENSIONS`` forces the Python one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._fast import load_twin

__all__ = ["COMPILED", "Node", "NodeRegistry"]

if TYPE_CHECKING:
    from ._nodes_py import Node, NodeRegistry

    COMPILED: bool
else:
    _impl, COMPILED = load_twin("shardon._nodes", "node registry")
    Node = _impl.Node
    NodeRegistry = _impl.NodeRegistry
