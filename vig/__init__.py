"""ViG, ViG-H and DiG on :func:`glakernels.gated_linear_attention`.

>>> import vig
>>> model = vig.create_model("vig_tiny", num_classes=10, img_size=224)

``vig.list_models()`` names every model. When timm is installed, importing ``vig`` also
registers the models with timm (``timm.create_model("vig_tiny")``).
"""

from ._registry import create_model, is_model, list_models, register_model
from .checkpoint import load_checkpoint, resample_pos_embed, unwrap_state_dict
from .vig import ViG
from .vig_h import HierViG
from .dig import DiG
from .diffusion import GaussianDiffusion

__all__ = [
    "create_model",
    "list_models",
    "is_model",
    "register_model",
    "load_checkpoint",
    "resample_pos_embed",
    "unwrap_state_dict",
    "ViG",
    "HierViG",
    "DiG",
    "GaussianDiffusion",
]
