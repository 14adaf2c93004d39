"""Re-export: the routing probe callback lives in :mod:`moelora_lit.lightning.probe`."""

from moelora_lit.lightning.probe import RoutingProbe

__all__ = ["RoutingProbe"]
