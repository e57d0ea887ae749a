"""gradzip: communication-efficient distributed training for PyTorch.

import gradzip
gradzip.methods()                                  # ['acpsgd', 'choco', 'doublesqueeze', ...]
state, hook = gradzip.ddp_hook("acpsgd", rank=4, model=ddp_model)
ddp_model.register_comm_hook(state, hook)
state.stats; state.state_dict(); state.load_state_dict(sd)

The names are loaded on first use, so ``import gradzip`` (and tools that only need a corner of it, such as
the benchmark's emulated cluster) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradzip.integrations.ddp import HookState, ddp_hook
    from gradzip.registry import make_config, methods

__all__ = ["HookState", "ddp_hook", "make_config", "methods"]
__version__ = "0.1.0"

_HOME = {
    "HookState": "gradzip.integrations.ddp",
    "ddp_hook": "gradzip.integrations.ddp",
    "make_config": "gradzip.registry",
    "methods": "gradzip.registry",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'gradzip' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once; later lookups do not come back here
    return value
