"""Keep the Ray instance a command starts for itself on loopback: the PPO driver's
(`python -m rlhf.ppo`) and the one Hydra's Ray launcher starts for a sweep (`-m hydra/launcher=ray_cluster`).

Ray decides when it is first imported whether a node takes the machine's address (its
servers then listen on every interface) or 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
The driver imports Ray long before its config is composed, so whether the run starts its
own instance is read from the command line: no `cluster=<not local>`, no
`cluster.address=<not null>` (no `hydra.launcher.ray.init.address=<not local>`) and no
RAY_ADDRESS. Nothing here imports Ray.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Sequence

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LAUNCHER_ADDRESS = "hydra.launcher.ray.init.address"  # conf/hydra/launcher/ray_cluster.yaml
_switched_here = False


def joins_a_cluster(overrides: Sequence[str], environ: Mapping[str, str]) -> bool:
    if environ.get("RAY_ADDRESS"):
        return True
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        value = value.strip().strip("'\"").lower()
        if (key == "cluster" and value not in ("", "local")) or \
                (key in ("cluster.address", LAUNCHER_ADDRESS) and value not in ("", "null", "none", "local")):
            return True
    return False


def keep_local_ray_on_loopback(overrides: Sequence[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the switch (unless the user set it) when these overrides start a local instance."""
    global _switched_here
    if not joins_a_cluster(overrides, environ) and LOOPBACK_SWITCH not in environ:
        environ[LOOPBACK_SWITCH] = "0"
        _switched_here = True


def check_join(address: str) -> None:
    """Joining `address` after the command line said the run would start its own instance: the
    address came from a config file, too late to give Ray this node's real address."""
    if _switched_here:
        raise ValueError(f"cluster.address={address} comes from a config file, but Ray has been imported "
                         f"for a local instance on 127.0.0.1; give the address on the command line "
                         f"(cluster=existing, cluster.address=...) or in RAY_ADDRESS")
