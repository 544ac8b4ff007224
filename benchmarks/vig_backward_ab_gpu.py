"""ViG training with the fourteenth session's backward changes (``AB=new``, the code as it is)
against the code before them (``AB=old``): cuDNN's depth-wise convolution backward, LayerNorm's
backward as PyTorch ops, one-stage row sums; ``AB=old-dw``, ``old-ln`` or ``old-sum`` reverts
one of the three. The remaining arguments go to ``models_gpu.py``:

    AB=old python benchmarks/vig_backward_ab_gpu.py --models ViG-T --points 224:128,1024:8 \\
        --compile-modes graph --modes train --min-time 0.5

Run it once per setting in one session (new, old, new, ...) and compare within the session.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models_gpu  # noqa: E402
from vig_backward_kernels_gpu import cudnn_depthwise_backward  # noqa: E402

from vig import fused, triton_backward  # noqa: E402


def main(argv=None) -> int:
    ab = os.environ.get("AB", "new")
    if ab not in ("new", "old", "old-dw", "old-ln", "old-sum"):
        raise SystemExit(f"AB: expected new, old, old-dw, old-ln or old-sum, got {ab!r}")
    if ab in ("old", "old-dw"):
        triton_backward.depthwise_conv_backward = cudnn_depthwise_backward
    if ab in ("old", "old-ln"):
        triton_backward.layer_norm_act_backward = fused._layer_norm_act_backward  # PyTorch ops
    if ab in ("old", "old-sum"):
        fused._sum_to_last = lambda x: x.reshape(-1, x.shape[-1]).float().sum(0)
    print(f"AB={ab}")
    return models_gpu.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
