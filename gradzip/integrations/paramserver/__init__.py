"""DoubleSqueeze through dedicated parameter servers (``placement="server"``), synchronous and asynchronous.

The world's last K ranks are servers that do not train; ranks ``0..n-1`` are workers. Server ``s`` owns part
``s`` of K of every tensor (as in BytePS), so the load is even whatever the model's layer sizes. Messages are
point-to-point on the world group (:mod:`gradzip.comm.wire`); the update rules are DoubleSqueeze's
(:mod:`gradzip.reducers.doublesqueeze`).

Synchronous (``doublesqueeze``): each worker pushes its compressed, error-compensated parts, each server
replies with the compressed aggregate of its part, and every worker runs its own optimizer on the assembled
gradient. Asynchronous (``doublesqueeze-async``): the servers hold the model and its optimizer and apply each
push as it arrives; a worker waits only for its own reply. Stale synchronous parallel bounds the lag: a worker
more than ``max_staleness`` pushes ahead of the slowest waits for its reply.

    if is_server(servers=2):
        serve()
    else:
        ps = PSWorker(model, "doublesqueeze", servers=2, compressor="topk")
        ... loss.backward(); ps.step(); opt.step() ...
        ps.close()
"""

from gradzip.comm.wire import ServerError, WorkerLost
from gradzip.integrations.paramserver.placement import ASYNC, SYNC, is_server, server_ranks
from gradzip.integrations.paramserver.server import serve
from gradzip.integrations.paramserver.worker import PSWorker

__all__ = ["ASYNC", "SYNC", "PSWorker", "ServerError", "WorkerLost", "is_server", "serve", "server_ranks"]
