"""W&B without credentials: log offline rather than fail, and say how to upload later.

Credentials are ``WANDB_API_KEY`` or a ``wandb login`` entry in the netrc file for the W&B
host (``WANDB_BASE_URL``, default api.wandb.ai). An explicit ``WANDB_MODE`` is always kept.
"""

from __future__ import annotations

import netrc
import os
import sys
from urllib.parse import urlparse

__all__ = ["default_wandb_offline", "wandb_credentials_available"]


def _wandb_host() -> str:
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return urlparse(base).hostname or "api.wandb.ai"


def wandb_credentials_available() -> bool:
    """Whether W&B can log online: ``WANDB_API_KEY`` set or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(_wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def default_wandb_offline() -> None:
    """Set ``WANDB_MODE=offline`` when no mode is chosen and no credentials exist, and say so."""
    if "WANDB_MODE" in os.environ or wandb_credentials_available():
        return
    os.environ["WANDB_MODE"] = "offline"
    print(
        "lightning-rpn: no W&B credentials (WANDB_API_KEY or `wandb login`); W&B logs offline. "
        "The `wandb sync <run dir>` command that uploads the run is printed at the end.",
        file=sys.stderr,
    )
