"""Gaussian diffusion for DiG: the noise-prediction training loss and a DDIM sampler.

The forward process is DDPM's (Ho et al. 2020) with DiT's linear schedule (1000 steps, β from
1e-4 to 0.02): ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε``. Training regresses ε (the "simple"
loss; the official DiG also trains the variance channels with a variational bound, which
sampling with DDIM does not need). Sampling is deterministic DDIM (Song et al. 2021) on an
evenly spaced subset of the timesteps, with optional classifier-free guidance.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["GaussianDiffusion"]


class GaussianDiffusion:
    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        # built in float64: ᾱ_t is a long product and its small values matter at t ≈ T
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def _alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        a = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        return a.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Noisy ``x_t`` for clean ``x0`` at integer timesteps ``t`` (``[B]``)."""
        a = self._alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_loss(self, model: nn.Module, x0: Tensor, y: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Tensor:
        """Mean squared error of the predicted noise at uniformly drawn timesteps."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        out = model(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(out[:, : x0.shape[1]].float(), noise.float())

    @torch.no_grad()
    def ddim_sample(
        self,
        eps_fn: Callable[[Tensor, Tensor], Tensor],
        shape: tuple[int, ...],
        steps: int = 50,
        device: str | torch.device = "cpu",
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
    ) -> Tensor:
        """Deterministic DDIM from pure noise to ``x_0``.

        ``eps_fn(x_t, t)`` returns the predicted noise (``[B, C, ...]``, the first ``C``
        channels are used). Returns ``x_0`` of ``shape``."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_timesteps}], got {steps}")
        x = noise if noise is not None else torch.randn(shape, device=device, generator=generator)
        times = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()
        channels = shape[1]
        for i, t in enumerate(times):
            t_batch = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
            eps = eps_fn(x, t_batch)[:, :channels].to(x.dtype)
            a_t = self.alphas_cumprod[t].item()
            a_prev = self.alphas_cumprod[times[i + 1]].item() if i + 1 < len(times) else 1.0
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x

    def sample(self, model: nn.Module, shape: tuple[int, ...], y: Optional[Tensor] = None, steps: int = 50,
               cfg_scale: float = 1.0, device: str | torch.device = "cpu",
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample a DiG (class labels ``y``; guidance when ``cfg_scale != 1``). The model runs in
        eval mode (no label dropout drawing from the global RNG, so the same generator gives the
        same samples) and returns to the mode it was in."""
        if cfg_scale != 1.0 and y is None:
            raise ValueError("cfg_scale != 1 needs class labels y")

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            if cfg_scale != 1.0:
                return model.forward_with_cfg(x, t, y, cfg_scale)
            return model(x, t, y)

        was_training = model.training
        model.eval()
        try:
            return self.ddim_sample(eps_fn, shape, steps, device, generator)
        finally:
            model.train(was_training)
