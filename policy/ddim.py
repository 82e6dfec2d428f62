"""One DDIM step as a stochastic policy, with the log-probability of its action.

DDPO treats denoising as an MDP: the state is (prompt, t, x_t), the action is
x_{t-1}, and the policy is the Gaussian DDIM step with noise ``eta * sigma_t``.
This module is the single place where that Gaussian is written down; sampling
and training both call :func:`ddim_step_with_logprob`, so their log-probs agree.

Final-step alpha: the previous timestep is clamped at 0, so the last step uses
``alphas_cumprod[0]`` (as Carve3D's and DDPO's reference code do), not the
scheduler's ``final_alpha_cumprod``.  With ``set_alpha_to_one=True`` the latter
is 1, which makes the last step deterministic (sigma = 0) and its log-prob
undefined; clamping keeps every step but one from t = 0 a proper Gaussian (a
trajectory that ends at t = 0, e.g. leading spacing with steps_offset=0, is
rejected with a message).

The previous timestep is ``t - num_train_timesteps // num_steps``, as in
diffusers' DDIM; with "trailing" spacing and a step count that does not divide
num_train_timesteps it can differ by one from the next listed timestep.
Sampling and training use the same rule, so their log-probs agree.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def per_sample(values: torch.Tensor, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[timestep]`` and shape it to broadcast against ``like`` ([B, ...])."""
    out = values.to(like.device)[timestep.to(values.device).long()].to(like.dtype)
    if out.ndim == 0:
        return out
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def previous_timestep(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The DDIM previous timestep, clamped at 0 (see the module docstring)."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return torch.clamp(timestep - step, min=0)


def predict_x0_and_eps(scheduler, model_output, timestep, sample):
    """Turn an epsilon-, sample- or v-prediction into (x0_hat, eps_hat) at ``timestep``."""
    alpha_t = per_sample(scheduler.alphas_cumprod, timestep, sample)
    beta_t = 1 - alpha_t
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif kind == "v_prediction":
        x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(
            f"prediction_type {kind!r} is not supported; use 'epsilon', 'sample' or 'v_prediction'"
        )
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("dynamic thresholding is not supported by the DDIM policy step; "
                         "set thresholding=False in the scheduler config")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0, eps


def ddim_step_mean_std(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM step's Gaussian ``N(mean, std^2)`` over x_{t-1} given x_t (``eta * sigma_t``
    noise); ``eta = 0`` is deterministic DDIM (std 0).  The one place the step is written."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    timestep = torch.as_tensor(timestep, device=sample.device)
    prev_t = previous_timestep(scheduler, timestep)
    x0, eps = predict_x0_and_eps(scheduler, model_output, timestep, sample)
    alpha_t = per_sample(scheduler.alphas_cumprod, timestep, sample)
    alpha_prev = per_sample(scheduler.alphas_cumprod, prev_t, sample)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def step_stds(scheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """The noise std of each DDIM step of ``timesteps`` ([T] -> [T]), as :func:`ddim_step_mean_std`
    draws it (the scheduler's ``set_timesteps`` must match ``timesteps``)."""
    like = torch.zeros(len(timesteps), 1)
    return ddim_step_mean_std(scheduler, like, timesteps.cpu(), like, eta)[1].flatten()


def trained_steps(scheduler, timesteps: torch.Tensor, eta: float, min_relative_std: float) -> torch.Tensor:
    """Indices of the steps whose noise std is at least ``min_relative_std`` times the largest
    step's: the steps a policy gradient learns from.  A step's score term
    (x_{t-1} - mean) / std^2 * d mean / d theta scales like 1 / std while the reward hardly depends
    on so small a noise, so the late, low-noise steps add gradient noise without signal
    (docs/minicarve.md, "Where the gradient noise comes from").  Never empty: the noisiest step
    always qualifies."""
    stds = step_stds(scheduler, timesteps, eta)
    return torch.nonzero(stds >= min_relative_std * stds.max()).flatten()


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and ``log p(x_{t-1} | x_t)``, one value per sample.

    ``timestep`` is an int or a tensor (scalar or [B]).  When ``prev_sample`` is
    given it is the action whose log-prob is returned (training); otherwise the
    action is sampled with ``generator`` (one per sample for per-sample seeds).
    The log-density is averaged, not summed, over all non-batch dimensions.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic policy with a log-prob, got {eta}; "
                         "eta = 0 is deterministic DDIM and has no density")
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if bool((std == 0).any()):
        raise ValueError(
            f"timestep {torch.as_tensor(timestep).tolist()} has no previous step (sigma = 0), so its "
            "log-prob is undefined; use a scheduler whose timesteps end above 0 (steps_offset=1 or "
            "timestep_spacing='trailing')")
    if prev_sample is None:
        prev_sample = mean + std * _noise_like(sample, generator)

    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddim_inversion_step(scheduler, model_output: torch.Tensor, timestep, prev_sample: torch.Tensor) -> torch.Tensor:
    """DDIM inversion x_{t-1} -> x_t (the "zag" of Z-Sampling / ZMV-Sampling).

    ``model_output`` is the model evaluated at ``prev_sample`` *and its own level* t-1
    (``previous_timestep``); its noise estimate carries x_{t-1} back up:
    x0 = (x_{t-1} - sqrt(1 - a_prev) eps) / sqrt(a_prev),  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.
    With the eps of a deterministic (eta = 0) step this undoes that step exactly.
    (Z-Sampling's code evaluates the model at t instead: the same for an eps-prediction model
    whose eps barely moves in one step, but degenerate for v-prediction near t = T, where
    a_t ~ 0 turns any output into eps = x.)"""
    timestep = torch.as_tensor(timestep, device=prev_sample.device)
    prev_t = previous_timestep(scheduler, timestep)
    x0, eps = predict_x0_and_eps(scheduler, model_output, prev_t, prev_sample)
    alpha_t = per_sample(scheduler.alphas_cumprod, timestep, prev_sample)
    alpha_prev = per_sample(scheduler.alphas_cumprod, prev_t, prev_sample)
    if not getattr(scheduler.config, "clip_sample", False):  # (clipping changes x0 but not eps)
        x0 = (prev_sample - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * eps


def _noise_like(sample: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise; a list of generators draws each sample's noise from its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != sample.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {sample.shape[0]}")
        return torch.stack([
            torch.randn(sample.shape[1:], generator=g, dtype=sample.dtype, device=g.device)
            for g in generator
        ]).to(sample.device)
    return torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                       device=generator.device if generator is not None else sample.device
                       ).to(sample.device)
