"""The all-reduce family of methods, one per file: how one DDP bucket of local gradients becomes the
aggregated gradient (:class:`~gradzip.reducers.reducer.Reducer`), built from the compressors and the
collectives below. DoubleSqueeze's rules live here too: its sharded placement is a reducer, and the
parameter-server processes run the same rules."""
