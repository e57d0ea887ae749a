"""How payloads travel: all-reduce and all-gather patterns (parameter servers and gossip come later)."""
