"""W&B without credentials: log offline rather than fail, and say how to upload later.

:func:`prepare_wandb_logger` readies a ``WandbLogger`` before its run starts: its folder made
(wandb looks for a git repository there and warns "git root ... does not exist" on a first run)
and Lightning's ``anonymous=None`` left out of ``wandb.init`` (wandb 0.2x warns "The anonymous
setting has no effect" whenever the argument is passed, ``None`` too).

Credentials are ``WANDB_API_KEY`` or a ``wandb login`` entry in the netrc file for the W&B
host: ``WANDB_BASE_URL``'s, else the installed wandb's default (api.forge.coreweave.com for
wandb 0.31, where ``wandb login`` writes its entry) or api.wandb.ai (older wandb's). An explicit
``WANDB_MODE`` is always kept.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["default_wandb_offline", "prepare_wandb_logger", "wandb_credentials_available"]


def _wandb_hosts() -> set[str]:
    """The hosts whose netrc entry logs W&B in (see the module docstring)."""
    base = os.environ.get("WANDB_BASE_URL")
    if base:
        return {urlparse(base).hostname or base}
    hosts = {"api.wandb.ai"}
    try:
        import wandb

        hosts.add(urlparse(wandb.Settings().base_url).hostname or "api.wandb.ai")
    except (ImportError, ValueError, AttributeError):  # no settings to read: the classic host
        pass
    return hosts


def wandb_credentials_available() -> bool:
    """Whether W&B can log online: ``WANDB_API_KEY`` set or a netrc entry for a W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entries = netrc.netrc(path)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(entries.authenticators(host) is not None for host in _wandb_hosts())


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


def prepare_wandb_logger(logger: Any) -> None:
    """Make a ``WandbLogger``'s ``save_dir`` and drop a ``None`` ``anonymous`` from the arguments its
    run will start with (see the module docstring); nothing once the run has started."""
    if logger.save_dir is not None:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
    init = getattr(logger, "_wandb_init", None)  # Lightning keeps wandb.init's arguments until the run starts
    if isinstance(init, dict) and getattr(logger, "_experiment", None) is None and init.get("anonymous", 0) is None:
        del init["anonymous"]
