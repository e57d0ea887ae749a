"""Decentralized training: no gradient all-reduce, each worker mixes its model with its neighbours' only.

g = gradzip.gossip.PowerGossip(model, topology="ring", rank=1)   # or DPSGD(...), Choco(...)
for x, y in data:
    loss(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
    g.step()                          # gossip with the neighbours
g.last_consensus_distance; g.stats; g.state_dict()
"""

from gradzip.comm.topology import TOPOLOGIES, Topology, make_topology
from gradzip.gossip.choco import Choco
from gradzip.gossip.dpsgd import DPSGD
from gradzip.gossip.powergossip import PowerGossip

__all__ = ["DPSGD", "TOPOLOGIES", "Choco", "PowerGossip", "Topology", "make_topology"]
