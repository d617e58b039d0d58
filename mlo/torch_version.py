"""The oldest torch this project runs on, checked when the modules that need torch are imported.

2.9: ``torch.backends.{cudnn.conv,cuda.matmul}.fp32_precision``, the TF32 switch of the hops
(``mlo.hypergradient.full_fp32``); it also has what the rest calls: fused Adam and SGD on the CPU,
``init_process_group(device_id=)``, ``torch.nn.attention.sdpa_kernel`` and functional collectives
whose ``all_reduce`` has a backward (p(s)'s gradient under torchrun, ``mlo.distributed``).
"""
from __future__ import annotations

from mlo.errors import UserError

MIN_TORCH = "2.9"


def check_torch(version=None) -> None:
    """Refuse a torch older than ``MIN_TORCH`` in one line (``version``: the installed one by default)."""
    import torch
    from torch.torch_version import TorchVersion

    found = TorchVersion(str(version or torch.__version__))
    if found < MIN_TORCH:
        raise UserError(f"needsgen needs torch >= {MIN_TORCH} and found {found}; upgrade it "
                        f"(pip install 'torch>={MIN_TORCH}' 'torchvision>=0.24')")


check_torch()
