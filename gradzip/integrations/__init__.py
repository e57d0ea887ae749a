"""How a method meets a training script: the DDP communication-hook adapter (``ddp``) and the
parameter-server processes (``paramserver``). The decentralized methods need no adapter: a
``gradzip.gossip`` object is itself called after ``optimizer.step()``."""
