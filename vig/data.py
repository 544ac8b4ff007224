"""A real dataset that ships inside an installed package: scikit-learn's handwritten digits.

1,797 grey-scale 8×8 digits (UCI), upsampled to the model's input size. No download, so the
training CLI runs anywhere, CI included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["load_digits_datasets"]

#: the digits' pixel statistics after scaling to [0, 1] (so the inputs are standardised)
_MEAN, _STD = 0.305, 0.375


def load_digits_datasets(img_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """Stratified train / test split of the digits as ``TensorDataset(images, labels)``;
    images are ``[N, 1, img_size, img_size]`` float32, standardised."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from error
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (images - _MEAN) / _STD
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (
        TensorDataset(images[train_idx].contiguous(), labels[train_idx]),
        TensorDataset(images[test_idx].contiguous(), labels[test_idx]),
    )
