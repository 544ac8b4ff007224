"""ViG training with the fourteenth to sixteenth sessions' changes (``AB=new``, the code as it
is) against the code before them (``AB=old``): cuDNN's depth-wise convolution backward,
LayerNorm's backward as PyTorch ops, one-stage row sums (session 14), the mixer's projections
as separate autograd nodes, every row-wise kernel at 4096 elements and 4 warps a program (the
latter also changes inference: the mix's forward), the patch convolution's weight gradient
from PyTorch's convolution backward (session 15), each module casting its own weights for
autocast (session 16; also inference); ``AB=old-dw``, ``old-ln``, ``old-sum``, ``old-proj``,
``old-rows``, ``old-patch`` or ``old-casts`` reverts one of the seven. The remaining
arguments go to ``models_gpu.py``:

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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glakernels import gated_linear_attention  # noqa: E402
from vig import fused, gla_mixer, triton_backward, triton_kernels  # noqa: E402
from vig import vig as vig_module  # noqa: E402


def pytorch_patch_conv_weight_grad(x, grad, kernel_size, stride, padding, dtype):
    """``vig.triton_backward.patch_conv_weight_grad`` as ``vig.fused`` computed it before
    (session 15): PyTorch's convolution backward on the image cast to ``dtype``."""
    weight = torch.empty(grad.shape[-1], x.shape[1], kernel_size, kernel_size, device=x.device, dtype=dtype)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad.to(dtype).permute(0, 3, 1, 2), x.to(dtype), weight, [grad.shape[-1]], [stride] * 2, [padding] * 2,
        [1, 1], False, [0, 0], 1, [False, True, True])
    return grad_w.float(), grad_b.float()


def separate_projections_forward_local(self, local, weights=None):
    """``GatedLinearAttention2D.forward_local`` before ``vig.mixer_projections`` (session 15):
    each projection of ``local`` its own autograd node, ``g_proj``'s matmul by ``F.linear``
    (``weights``: the mixer's matmul weights already cast, session 16, or None)."""
    B, H, W, C = local.shape
    heads, kd = self.num_heads, self.key_dim
    w_qkv, w_g, w_down, w_up, w_out = self.matmul_weights() if weights is None else weights
    w_qkv = fused.autocast_weight(w_qkv, local)
    q, k, v = (F.linear(local, w).view(B, H * W, heads, -1) for w in (w_qkv[:kd], w_qkv[kd : 2 * kd], w_qkv[2 * kd :]))
    g_fwd, g_rev = fused.low_rank_log_gates_pair(local, w_down, w_up, self.gk_proj[1].bias, self.gate_logit_normalizer)
    o = gated_linear_attention(q, k, v, g_fwd.view(B, H * W, heads, -1), bidirectional=True,
                               g_reverse=g_rev.view(B, H * W, heads, -1))
    logits = F.linear(local, w_g, self.g_proj.bias).view(B, H * W, heads, -1)
    out = fused.mix_global_local(o, local.reshape(B, H * W, heads, -1), logits, self.g_norm.weight,
                                 self.l_norm.weight, self.norm_eps, self.out_act, w_out)
    return out.view(B, H, W, -1)


def main(argv=None) -> int:
    ab = os.environ.get("AB", "new")
    choices = ("new", "old", "old-dw", "old-ln", "old-sum", "old-proj", "old-rows", "old-patch", "old-casts")
    if ab not in choices:
        raise SystemExit(f"AB: expected one of {', '.join(choices)}, got {ab!r}")
    if ab in ("old", "old-dw"):
        triton_backward.depthwise_conv_backward = cudnn_depthwise_backward
    if ab in ("old", "old-ln"):
        triton_backward.layer_norm_act_backward = fused._layer_norm_act_backward  # PyTorch ops
    if ab in ("old", "old-sum"):
        fused._sum_to_last = lambda x: x.reshape(-1, x.shape[-1]).float().sum(0)
    if ab in ("old", "old-proj"):
        gla_mixer.GatedLinearAttention2D.forward_local = separate_projections_forward_local
    if ab in ("old", "old-rows"):
        triton_kernels.ROWS_LAUNCH.update({name: (4096, 4) for name in triton_kernels.ROWS_LAUNCH})
    if ab in ("old", "old-patch"):
        triton_backward.patch_conv_weight_grad = pytorch_patch_conv_weight_grad
    if ab in ("old", "old-casts"):  # each module casts its own weights (autocast's per-weight casts)
        vig_module.autocast_matmul_weights = lambda modules, like: [None] * len(modules)
    print(f"AB={ab}")
    return models_gpu.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
