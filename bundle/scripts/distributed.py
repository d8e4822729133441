"""DistributedDataParallel where a process group is running, the plain module everywhere else.

The trainers of every stage get their network through ``data_parallel``; the configs need no other change to run
under ``torchrun`` (configs/multi_gpu.yaml initialises the process group and shards the data).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["data_parallel"]


def data_parallel(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when torch.distributed is initialised with more than one
    process, else ``module`` itself.

    Args:
        module: the network, already on its device (a CUDA device gives ``device_ids=[index]``).
        find_unused_parameters: True when some trainable parameters get no gradient in a step (e.g. the U-Net
            decoder during the global stage); DDP then looks for them after each backward pass.

    Only the trainer should see the wrapper: optimisers, validation and checkpoints keep using ``module`` (its
    state_dict keys carry no ``module.`` prefix, and evaluation runs no collective operation).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> data_parallel(net) is net  # one process
        True
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return module
    device = next(module.parameters()).device
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)
