"""Trinity-RFT 0.6.0 interop: its TRXP payloads, and a drop-in for its rollout coordinator.

- ``decode_trxp`` / ``encode_trxp`` (``trxp.py``): read and write Trinity's experience
  payloads without torch and without unpickling arbitrary classes.
- ``RolloutCoordinator`` (``coordinator.py``): Trinity's coordinator API on fastrollout's
  scheduler, running Trinity's own tasks, workflows, model wrappers and experience pipeline.
- ``install()`` (``install.py``): the one call that makes Trinity's Explorer build that
  coordinator, in this process and in the Ray workers started after it.

Names load on first use: importing this package imports neither Ray nor Trinity.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import lazy_getattr

_EXPORTS = {
    "MAGIC": ".trxp", "decode_trxp": ".trxp", "encode_trxp": ".trxp",
    "RolloutCoordinator": ".coordinator",
    "install": ".install", "patch": ".install",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .coordinator import RolloutCoordinator as RolloutCoordinator
    from .install import install as install
    from .install import patch as patch
    from .trxp import MAGIC as MAGIC
    from .trxp import decode_trxp as decode_trxp
    from .trxp import encode_trxp as encode_trxp
