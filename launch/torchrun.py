"""torchrun whose stores listen on loopback alone when its ranks meet at a loopback address.

    python -m launch.torchrun --standalone --nproc_per_node 8 -m trainer.sft [overrides]

The same arguments and behaviour as `torchrun` (`torch.distributed.run`, which it runs). torchrun's agent
creates the store its ranks meet at, and torch's `TCPStore` listens on every interface whatever address it is
given. Here a store whose address is a loopback one (`--standalone`; a one-node run's default `127.0.0.1`;
`--rdzv_endpoint 127.0.0.1:PORT`) gets a socket bound to that address alone, the only address its ranks connect
to anyway, and the ranks' gloo pairs bind the loopback interface (`GLOO_SOCKET_IFNAME=lo`, unless set). A world
whose address other nodes must reach is left as torchrun makes it.
"""

from __future__ import annotations

import sys
from typing import Optional

from trainer.loopback import gloo_on_loopback, is_loopback, listening_socket


def loopback_tcpstore_class():
    """torch's TCPStore, whose server at a loopback address listens on that address alone (a function: importing
    this module loads no torch)."""
    import torch.distributed as dist

    class LoopbackTCPStore(dist.TCPStore):
        def __init__(self, host_name: str, port: int, world_size: Optional[int] = None, is_master: bool = False,
                     *args, **kwargs):
            if is_loopback(host_name):
                gloo_on_loopback()  # the agent's environment is its ranks': every rank is on this machine
                if is_master and kwargs.get("master_listen_fd") is None:
                    # port 0 (torchrun's --standalone) becomes the one the socket got
                    kwargs["master_listen_fd"], port = listening_socket(host_name, port)
            super().__init__(host_name, port, world_size, is_master, *args, **kwargs)

    return LoopbackTCPStore


def main(argv: Optional[list[str]] = None) -> None:
    import torch.distributed as dist

    # Before torchrun imports its rendezvous backends, which take the class by name when imported; the agent
    # looks it up on torch.distributed when it creates a store.
    dist.TCPStore = loopback_tcpstore_class()
    from torch.distributed.run import main as torchrun

    torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
