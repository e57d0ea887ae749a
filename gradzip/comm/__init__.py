"""How bytes travel, knowing nothing about what a payload means: collectives with this worker's byte accounting
(and a world of one), the point-to-point messages of the parameter servers, the neighbour exchange of gossip,
and the topologies that say who is whose neighbour."""
