"""gradzip: communication-efficient distributed training for PyTorch.

import gradzip
gradzip.methods()                                  # ['acpsgd', 'fp16', 'powersgd', ...]
state, hook = gradzip.ddp_hook("acpsgd", rank=4, model=ddp_model)
ddp_model.register_comm_hook(state, hook)
state.stats; state.state_dict(); state.load_state_dict(sd)
"""

from gradzip.ddp import HookState, ddp_hook
from gradzip.registry import make_config, methods

__all__ = ["HookState", "ddp_hook", "make_config", "methods"]
__version__ = "0.1.0"
