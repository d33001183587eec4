"""Gaussian diffusion: schedule, posterior, losses, respacing, samplers and guidance, checked
against closed forms computed independently (float64 numpy, scipy, torch.distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from matten.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    beta_schedule,
    classifier_free_guidance,
    create_diffusion,
    forcing_timesteps,
    space_timesteps,
)
from matten.diffusion.gaussian_math import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

T = 1000


def reference_schedule(num_steps=T):
    """Linear schedule and derived quantities, from the formulas, in float64 numpy."""
    betas = np.linspace(1e-4 * 1000 / num_steps, 0.02 * 1000 / num_steps, num_steps)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    coef_x0 = np.sqrt(abar_prev) * betas / (1 - abar)
    coef_xt = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
    return dict(
        betas=betas,
        abar=abar,
        abar_prev=abar_prev,
        beta_tilde=beta_tilde,
        coef_x0=coef_x0,
        coef_xt=coef_xt,
    )


def zero_variance_model(x, t, **kwargs):
    """A model that predicts eps = 0.1 x and v = 0."""
    return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)


# ---------------------------------------------------------------------------- schedule, posterior


def test_linear_schedule():
    d = GaussianDiffusion()
    assert d.num_timesteps == T and d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(d.alphas_cumprod, reference_schedule()["abar"], rtol=1e-12)
    short = create_diffusion(diffusion_steps=250)
    assert short.betas[0] == pytest.approx(4e-4) and short.betas[-1] == pytest.approx(0.08)


def test_posterior_mean_variance_matches_closed_form():
    d, ref = GaussianDiffusion(), reference_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 500, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    tn = t.numpy()[:, None, None, None, None]
    expected_mean = ref["coef_x0"][tn] * x0.numpy() + ref["coef_xt"][tn] * xt.numpy()
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var.numpy().reshape(-1), ref["beta_tilde"][t.numpy()], rtol=1e-10)
    assert var[0].item() == 0.0  # q(x_{-1} | x_0, x_0) is a point mass
    # log beta-tilde is floored at t = 0 by beta-tilde_1.
    expected_log = np.log(ref["beta_tilde"][[1, 1, 17, 500, 999]])
    np.testing.assert_allclose(log_var.numpy().reshape(-1), expected_log, rtol=1e-10)


def test_learned_range_variance_interpolates_logs():
    d, ref = GaussianDiffusion(), reference_schedule()
    x = torch.zeros(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([3, 200, 999])
    for v, expected in [
        (-1.0, np.log(ref["beta_tilde"][t])),
        (1.0, np.log(ref["betas"][t])),
        (0.0, 0.5 * np.log(ref["beta_tilde"][t] * ref["betas"][t])),
    ]:

        def model(x, t, v=v):
            return torch.cat([x, torch.full_like(x, v)], 1)

        out = d.p_mean_variance(model, x, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0].numpy(), expected, rtol=1e-10)


# ---------------------------------------------------------------------------- gaussian math


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = torch.randn(4, 1000, generator=g, dtype=torch.float64) * 2
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
        torch.distributions.Normal(m2, torch.exp(0.5 * lv2)),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_approx_standard_normal_cdf_close_to_scipy():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    np.testing.assert_allclose(
        approx_standard_normal_cdf(x).numpy(), norm.cdf(x.numpy()), atol=2e-4
    )


def test_discretized_gaussian_log_likelihood_matches_scipy_bins():
    g = torch.Generator().manual_seed(2)
    levels = -1 + 2 * torch.arange(256, dtype=torch.float64) / 255
    x = levels.repeat(12, 1)
    # Means near and past the edges so that the open edge bins carry much of the mass.
    means = torch.linspace(-1.3, 1.3, 12, dtype=torch.float64)[:, None].expand_as(x)
    log_scales = (torch.rand(12, 1, generator=g, dtype=torch.float64) * 3 - 3.5).expand_as(x)
    log_p = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).numpy()

    # Direct computation: mass of [x - 1/255, x + 1/255], the first bin open to -inf and the last
    # one open to +inf.
    xn, mn, sn = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    upper = np.where(np.arange(256) == 255, np.inf, xn + 1 / 255)
    lower = np.where(np.arange(256) == 0, -np.inf, xn - 1 / 255)
    p = norm.cdf((upper - mn) / sn) - norm.cdf((lower - mn) / sn)
    assert p[:, [0, -1]].max() > 0.5  # the edge bins are really exercised
    # The CDF approximation is good to 2e-4 absolute, so a bin's mass is good to 4e-4.
    np.testing.assert_allclose(np.exp(log_p), p, atol=4e-4)
    big = p > 0.05
    np.testing.assert_allclose(log_p[big], np.log(p[big]), rtol=0, atol=0.01)
    # The bins tile the real line, so their masses sum to one.
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, atol=1e-9)


# ---------------------------------------------------------------------------- forward process


def test_q_sample_statistics():
    d, ref = GaussianDiffusion(), reference_schedule()
    n, t_value, x0_value = 200_000, 300, 0.7
    g = torch.Generator().manual_seed(3)
    x0 = torch.full((n, 1), x0_value, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((n,), t_value), generator=g)
    abar = ref["abar"][t_value]
    mean_se = math.sqrt((1 - abar) / n)
    assert abs(xt.mean().item() - math.sqrt(abar) * x0_value) < 5 * mean_se
    var_se = (1 - abar) * math.sqrt(2 / n)
    assert abs(xt.var().item() - (1 - abar)) < 5 * var_se


def test_per_frame_timesteps_give_each_frame_its_own_noise_level():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 2, 5, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([[0, 10, 500, 999, 250], [999, 998, 0, 1, 2], [7, 7, 7, 7, 7]])
    xt = d.q_sample(x0, t, noise=noise)
    for f in range(5):
        per_sample = d.q_sample(x0[:, :, f], t[:, f], noise=noise[:, :, f])
        torch.testing.assert_close(xt[:, :, f], per_sample, rtol=0, atol=0)
    # The frames of a sample really are at different levels.
    assert not torch.allclose(xt[0, :, 0], xt[0, :, 3])


def test_bad_timesteps_raise():
    d = GaussianDiffusion()
    x = torch.zeros(2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        d.q_sample(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        d.q_sample(x, torch.zeros(2, 5, dtype=torch.long))  # 5 frames for 4
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        d.q_sample(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integer"):
        d.q_sample(x, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------- training losses


def oracle_model(noise, v=-1.0):
    """A model that knows the true noise; v = -1 selects the true posterior variance."""
    return lambda x, t, **kwargs: torch.cat([noise, torch.full_like(noise, v)], dim=1)


def test_oracle_model_has_zero_mse_and_zero_kl():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 50, 500, 999])
    losses = d.training_losses(oracle_model(noise), x0, t, noise=noise)
    assert set(losses) == {"mse", "vb", "loss"} and losses["loss"].shape == (4,)
    assert torch.all(losses["mse"] == 0)
    # With the true noise and the true variance, p(x_{t-1} | x_t) is the true posterior.
    assert losses["vb"].abs().max() < 1e-8
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_term_matches_closed_form_with_rescaling():
    ref = reference_schedule(T)
    g = torch.Generator().manual_seed(6)
    x0 = (torch.randint(0, 256, (4, 2, 3, 2, 2), generator=g) * 2 / 255 - 1).double()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    model = lambda x, t: torch.cat([eps, v], 1)  # noqa: E731
    t = torch.tensor([0, 3, 400, 999])

    # Closed form for the full 1000-step chain, in numpy.
    tn = t.numpy()[:, None, None, None, None]
    abar, a0, e, vn = ref["abar"][tn], x0.numpy(), eps.numpy(), v.numpy()
    xt = np.sqrt(abar) * a0 + np.sqrt(1 - abar) * noise.numpy()
    pred_x0 = (xt - np.sqrt(1 - abar) * e) / np.sqrt(abar)
    model_mean = ref["coef_x0"][tn] * pred_x0 + ref["coef_xt"][tn] * xt
    log_floor = np.log(np.append(ref["beta_tilde"][1], ref["beta_tilde"][1:]))[tn]
    model_logvar = (vn + 1) / 2 * np.log(ref["betas"][tn]) + (1 - vn) / 2 * log_floor
    true_mean = ref["coef_x0"][tn] * a0 + ref["coef_xt"][tn] * xt
    kl = 0.5 * (
        -1
        + model_logvar
        - log_floor
        + np.exp(log_floor - model_logvar)
        + (true_mean - model_mean) ** 2 * np.exp(-model_logvar)
    )
    std = np.exp(0.5 * model_logvar)
    upper = np.where(a0 > 0.999, np.inf, a0 + 1 / 255)
    lower = np.where(a0 < -0.999, -np.inf, a0 - 1 / 255)
    with np.errstate(divide="ignore"):  # rows with t > 0 have empty bins; their nll is unused
        nll = -np.log(norm.cdf((upper - model_mean) / std) - norm.cdf((lower - model_mean) / std))
    per_elem = np.where(tn == 0, nll, kl) / np.log(2)
    expected = per_elem.reshape(4, -1).mean(axis=1)

    losses = GaussianDiffusion().training_losses(model, x0, t, noise=noise)
    np.testing.assert_allclose(losses["vb"].numpy()[1:], expected[1:], rtol=1e-8)
    np.testing.assert_allclose(losses["vb"].numpy()[0], expected[0], rtol=2e-2)  # approx. CDF
    np.testing.assert_allclose(
        losses["mse"].numpy(), ((e - noise.numpy()) ** 2).reshape(4, -1).mean(axis=1), rtol=1e-12
    )

    # A 100-step chain weights its vb term by 100 / 1000: compare with the unscaled bound.
    spaced = create_diffusion("100")
    raw = spaced._vb_terms_bpd(
        torch.cat([eps, v], 1), x0, spaced.q_sample(x0, t // 10, noise), t // 10
    )
    scaled = spaced.training_losses(model, x0, t // 10, noise=noise)["vb"]
    torch.testing.assert_close(scaled, raw * 0.1)


def test_vb_term_sends_no_gradient_to_eps():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(2, 3, 2, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g).requires_grad_()
    v = (torch.rand(x0.shape, generator=g) * 2 - 1).requires_grad_()
    model = lambda x, t: torch.cat([eps, v], 1)  # noqa: E731
    losses = d.training_losses(model, x0, torch.tensor([0, 600]))
    losses["vb"].sum().backward(retain_graph=True)
    # The eps channels get no gradient at all (None) or an exactly zero one (through the split).
    assert eps.grad is None or torch.count_nonzero(eps.grad) == 0
    assert v.grad is not None and v.grad.abs().sum() > 0
    losses["mse"].sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def elementwise_model(x, t):
    """Each frame's output depends on that frame only, so per-frame losses can be checked one
    frame at a time."""
    return torch.cat([0.9 * x, torch.tanh(x)], 1)


def clip_and_frame_losses(seed, t):
    """A random (2, 3, 4, 4, 4) clip and noise, and the losses of each frame run on its own:
    {key: (B, F)}."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 4, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    frames = [
        GaussianDiffusion().training_losses(
            elementwise_model, x0[:, :, f], t[:, f], noise=noise[:, :, f]
        )
        for f in range(4)
    ]
    return (
        x0,
        noise,
        {key: torch.stack([fr[key] for fr in frames], dim=1) for key in ("mse", "vb", "loss")},
    )


def test_per_frame_losses_equal_frame_by_frame_losses():
    t = torch.tensor([[0, 5, 300, 999], [42, 0, 0, 7]])
    x0, noise, per_frame = clip_and_frame_losses(8, t)
    whole = GaussianDiffusion().training_losses(elementwise_model, x0, t, noise=noise)
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(whole[key], per_frame[key].mean(1), rtol=1e-12, atol=1e-12)


def test_frame_weights_leave_history_frames_out_of_the_loss():
    d = GaussianDiffusion()
    t = torch.tensor([[0, 0, 300, 999], [0, 17, 5, 7]])
    weight = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    x0, noise, per_frame = clip_and_frame_losses(9, t)
    weighted = d.training_losses(elementwise_model, x0, t, noise=noise, frame_weight=weight)
    for key in ("mse", "vb", "loss"):
        expected = torch.stack([per_frame[key][0, 2:].mean(), per_frame[key][1, 1:].mean()])
        torch.testing.assert_close(weighted[key], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="frame_weight"):
        d.training_losses(elementwise_model, x0, t, noise=noise, frame_weight=weight[:, :3])


def test_forcing_timesteps_draw_a_level_per_frame_and_clean_history():
    torch.manual_seed(0)
    t, weight = forcing_timesteps(4000, 8, 1000)
    assert t.shape == (4000, 8) and weight is None
    # independent per frame: uniform over [0, 1000), frames uncorrelated
    assert abs(t.float().mean().item() - 499.5) < 5 and t.min() == 0 and t.max() == 999
    corr = np.corrcoef(t[:, 0].numpy(), t[:, 1].numpy())[0, 1]
    assert abs(corr) < 0.05
    t, weight = forcing_timesteps(4000, 8, 1000, history_prob=0.5)
    history = weight == 0
    # history is a prefix: clean (t = 0) and out of the loss; it leaves a frame to denoise
    assert (t[history] == 0).all()
    assert torch.equal(history, history.cummin(dim=1).values)
    length = history.sum(1)
    assert length.max() <= 7
    with_history = length > 0
    assert abs(with_history.float().mean().item() - 0.5) < 0.03
    # prefix lengths uniform over 1 .. F - 1
    counts = torch.bincount(length[with_history], minlength=8)[1:]
    assert counts.min() > 0.8 * counts.float().mean()
    # the other frames keep independent levels
    assert abs(t[~history].float().mean().item() - 499.5) < 10
    with pytest.raises(ValueError, match="history_prob"):
        forcing_timesteps(2, 4, 1000, history_prob=1.5)


def test_context_noise_gives_history_frames_a_small_level_and_is_off_at_zero():
    def draw(**kw):
        torch.manual_seed(3)
        return forcing_timesteps(500, 6, 1000, history_prob=0.5, **kw)

    t_off, w_off = draw()
    t_zero, w_zero = draw(context_noise=0.0)
    assert torch.equal(t_off, t_zero) and torch.equal(w_off, w_zero)  # off: the same draws
    t_on, w_on = draw(context_noise=0.05)
    history = w_on == 0
    assert torch.equal(w_on, w_off) and history.any()  # the same history, still out of the loss
    assert (t_on[history] >= 0).all() and (t_on[history] <= 50).all()
    assert t_on[history].max() > 40  # uniform up to the bound, not a constant
    # clean history (level 0, what sampling commits) stays among the levels drawn
    assert (t_on[history] == 0).any() and (t_on[history] > 0).float().mean() > 0.9
    assert torch.equal(t_on[~history], t_off[~history])  # the other frames are untouched
    assert (t_off[history] == 0).all()
    t_tiny, _ = draw(context_noise=1e-4)  # a bound under one step is one step
    assert set(t_tiny[history].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="context_noise"):
        forcing_timesteps(2, 4, 1000, history_prob=0.5, context_noise=1.0)


def test_wrong_model_output_channels_raise():
    d = GaussianDiffusion()
    x0 = torch.zeros(2, 4, 3, 4, 4)
    with pytest.raises(ValueError, match="expected"):
        d.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
    fixed = create_diffusion(learn_sigma=False)
    with pytest.raises(ValueError, match="expected"):
        fixed.training_losses(zero_variance_model, x0, torch.tensor([1, 2]))
    losses = fixed.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
    assert "vb" not in losses and torch.equal(losses["loss"], losses["mse"])


# ---------------------------------------------------------------------------- respacing


def test_space_timesteps_values():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, 1000) == set(range(1000))
    # Three sections of 100, strides 99/9 = 11, 99/14, 99/19, rounded half to even.
    expected = {round(k * 11) for k in range(10)}
    expected |= {100 + round(k * 99 / 14) for k in range(15)}
    expected |= {200 + round(k * 99 / 19) for k in range(20)}
    assert space_timesteps(300, [10, 15, 20]) == expected
    assert space_timesteps(300, "10,15,20") == expected
    assert len(expected) == 45 and {0, 99, 100, 199, 200, 299} <= expected
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999
    # Uneven sections: the first takes the remainder.
    assert space_timesteps(10, [2, 2, 2]) == {0, 3, 4, 6, 7, 9}


@pytest.mark.parametrize("spec", ["1001", "ddim1", "ddimX", "abc", [0, 0], [-1, 5], [600, 600]])
def test_space_timesteps_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


def test_spaced_diffusion_keeps_marginals():
    base = GaussianDiffusion()
    for spec in ["ddim50", "250", "10,15,20", ""]:
        spaced = create_diffusion(spec)
        kept = sorted(spaced.use_timesteps)
        assert list(spaced.timestep_map) == kept and spaced.num_timesteps == len(kept)
        np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert create_diffusion("").num_timesteps == 1000
    with pytest.raises(ValueError):
        SpacedDiffusion([0, 1000])
    with pytest.raises(ValueError):
        SpacedDiffusion([])


def test_spaced_model_receives_original_timesteps():
    spaced = create_diffusion("ddim10")  # kept steps 0, 100, ..., 900
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.cat([x, torch.zeros_like(x)], 1)

    x = torch.zeros(2, 1, 3, 2, 2)
    spaced.p_mean_variance(model, x, torch.tensor([9, 1]))
    spaced.training_losses(model, x, torch.tensor([[0, 5, 9], [3, 3, 2]]))
    assert torch.equal(seen[0], torch.tensor([900, 100]))
    assert torch.equal(seen[1], torch.tensor([[0, 500, 900], [300, 300, 200]]))
    spaced.ddim_sample_loop(model, x.shape)
    assert [int(t[0]) for t in seen[2:]] == list(range(900, -1, -100))


# ---------------------------------------------------------------------------- samplers


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    d = create_diffusion("ddim10")
    noise = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    a = d.ddim_sample_loop(
        zero_variance_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1)
    )
    b = d.ddim_sample_loop(
        zero_variance_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(
        zero_variance_model,
        noise.shape,
        eta=1.0,
        noise=noise,
        generator=torch.Generator().manual_seed(3),
    )
    assert not torch.allclose(a, c)
    # With eta = 1 the generator makes it reproducible.
    c2 = d.ddim_sample_loop(
        zero_variance_model,
        noise.shape,
        eta=1.0,
        noise=noise,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(c, c2)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_sample_loop(zero_variance_model, noise.shape, eta=1.5)


def test_ddpm_loop_runs_with_a_tiny_model():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(3, 6, 3, padding=1)
    d = create_diffusion("10")
    shape = (2, 3, 4, 6, 6)
    out = d.p_sample_loop(
        lambda x, t: net(x),
        shape,
        generator=torch.Generator().manual_seed(0),
        clip_denoised=True,
        progress=True,
    )
    assert out.shape == shape and torch.isfinite(out).all()
    again = d.p_sample_loop(
        lambda x, t: net(x), shape, clip_denoised=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, again)
    steps = list(d.p_sample_loop_progressive(lambda x, t: net(x), shape))
    assert len(steps) == 10


def gaussian_data_oracle(mu, s):
    """The exact E[eps | x_t] for data x_0 ~ N(mu, s^2), called with original 1000-step indices."""
    abar = torch.from_numpy(GaussianDiffusion().alphas_cumprod)

    def model(x, t):
        a = abar[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_a_gaussian_data_distribution(sampler):
    mu, s, n = 0.3, 0.5, 8000
    d = create_diffusion("" if sampler == "ddpm" else "250")
    g = torch.Generator().manual_seed(10)
    model = gaussian_data_oracle(mu, s)
    if sampler == "ddpm":
        out = d.p_sample_loop(model, (2, n // 2), generator=g)
    else:
        out = d.ddim_sample_loop(model, (2, n // 2), generator=g)
    assert abs(out.mean().item() - mu) < 5 * s / math.sqrt(n)
    assert abs(out.std().item() - s) < 0.04 * s  # 3.6 standard errors


# ---------------------------------------------------------------------------- guidance


def labelled_model(x, t, y):
    """eps and v channels that depend on the label, so guidance has something to do."""
    scale = (1 + y.float()).view(-1, *([1] * (x.dim() - 1)))
    return torch.cat([torch.sin(x * scale), torch.tanh(x + scale)], dim=1)


def test_classifier_free_guidance():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 2, 4, 4, generator=g)
    t = torch.tensor([5, 50, 500])
    y = torch.tensor([1, 2, 3])
    null = torch.full_like(y, 7)
    cond, uncond = labelled_model(x, t, y), labelled_model(x, t, null)

    assert torch.equal(classifier_free_guidance(labelled_model, 1.0, 7)(x, t, y=y), cond)
    zero = classifier_free_guidance(labelled_model, 0.0, 7)(x, t, y=y)
    assert torch.equal(zero[:, :2], uncond[:, :2])
    assert torch.equal(zero[:, 2:], cond[:, 2:])  # the learned variance stays conditional
    four = classifier_free_guidance(labelled_model, 4.0, 7)(x, t, y=y)
    torch.testing.assert_close(four[:, :2], uncond[:, :2] + 4 * (cond[:, :2] - uncond[:, :2]))
    assert torch.equal(four[:, 2:], cond[:, 2:])
    with pytest.raises(ValueError, match="cfg_scale"):
        classifier_free_guidance(labelled_model, float("nan"), 7)

    sample = create_diffusion("ddim5").ddim_sample_loop(
        classifier_free_guidance(labelled_model, 4.0, 7),
        x.shape,
        model_kwargs={"y": y},
        generator=torch.Generator().manual_seed(0),
    )
    assert sample.shape == x.shape and torch.isfinite(sample).all()


# ---------------------------------------------------------------------------- velocity prediction


def test_velocity_oracle_recovers_eps_and_x0_and_has_zero_loss():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), computed here from the
    reference schedule: the true v gives zero L_simple, the true eps, the exact x0 and a zero KL,
    at every noise level (with the true variance, as for the eps oracle)."""
    ref = reference_schedule()
    d = GaussianDiffusion(prediction="velocity")
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(4, 3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 50, 500, 999])
    abar = torch.from_numpy(ref["abar"])[t].view(4, 1, 1, 1, 1)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    # v = -1 selects the posterior variance beta-tilde_t, the true one for t >= 1
    v_var = -torch.ones_like(x0)

    def model(x, t_, **kwargs):
        return torch.cat([velocity, v_var], dim=1)

    losses = d.training_losses(model, x0, t, noise=noise)
    assert losses["mse"].max() < 1e-28 and losses["vb"].abs().max() < 1e-8
    x_t = d.q_sample(x0, t, noise=noise)
    out = d.p_mean_variance(model, x_t, t)
    torch.testing.assert_close(out["eps"], noise, rtol=0, atol=1e-9)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="x0")


def test_velocity_prediction_survives_respacing():
    d = create_diffusion("10", prediction="velocity")
    assert d.prediction == "velocity"
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(2, 3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 9])
    abar = torch.from_numpy(d.alphas_cumprod)[t].view(2, 1, 1, 1, 1)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    out = d.p_mean_variance(
        lambda x, t_: torch.cat([velocity, torch.zeros_like(x)], 1),
        d.q_sample(x0, t, noise=noise),
        t,
    )
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------- cosine, Min-SNR


def test_cosine_schedule_follows_the_squared_cosine():
    """IDDPM's cosine schedule: abar(t) = f(t + 1) / f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2,
    computed here directly (not as a product of betas), wherever the 0.999 cap does not bind."""
    d = create_diffusion(schedule="cosine")
    s = 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    abar = f[1:] / f[0]
    capped = np.flatnonzero(d.betas >= 0.999)
    assert list(capped) == [T - 1]  # only the last step is capped
    np.testing.assert_allclose(d.alphas_cumprod[:-1], abar[:-1], rtol=1e-10)
    # noise comes more slowly than in the linear schedule: abar is larger at the midpoint
    assert d.alphas_cumprod[T // 2] > 0.45 > GaussianDiffusion().alphas_cumprod[T // 2]
    np.testing.assert_array_equal(beta_schedule("linear", T), GaussianDiffusion().betas)
    with pytest.raises(ValueError, match="schedule"):
        create_diffusion(schedule="quadratic")


@pytest.mark.parametrize("prediction", ["eps", "velocity"])
def test_min_snr_weights_each_noise_level_as_hang_et_al(prediction):
    """L_simple with Min-SNR-5 equals the uniform L_simple times min(SNR, 5) / SNR (eps) or
    min(SNR, 5) / (SNR + 1) (velocity), SNR = abar / (1 - abar) of each sample's (and, under
    forcing, each frame's) level; the variance term is unchanged."""
    ref = reference_schedule()
    uniform = GaussianDiffusion(prediction=prediction)
    weighted = GaussianDiffusion(prediction=prediction, loss_weighting="min_snr")
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(4, 3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for t in (
        torch.tensor([0, 30, 300, 999]),
        torch.tensor([[5, 900], [999, 0], [1, 2], [60, 61]]),
    ):
        a = uniform.training_losses(zero_variance_model, x0, t, noise=noise)
        b = weighted.training_losses(zero_variance_model, x0, t, noise=noise)
        snr = ref["abar"][t.numpy()] / (1 - ref["abar"][t.numpy()])
        w = np.minimum(snr, 5.0) / (snr + 1 if prediction == "velocity" else snr)
        if t.dim() == 1:
            expected = a["mse"].numpy() * w
        else:  # one level per frame: each frame's mean error weighted by its own level
            x_t = uniform.q_sample(x0, t, noise=noise)
            out = zero_variance_model(x_t, t)[:, :3]
            target = (
                noise
                if prediction == "eps"
                else (
                    torch.from_numpy(ref["abar"][t.numpy()]).sqrt().view(4, 1, 2, 1, 1) * noise
                    - torch.from_numpy(1 - ref["abar"][t.numpy()]).sqrt().view(4, 1, 2, 1, 1) * x0
                )
            )
            per_frame = ((target - out) ** 2).mean(dim=(1, 3, 4)).numpy()
            expected = (per_frame * w).mean(1)
        np.testing.assert_allclose(b["mse"].numpy(), expected, rtol=1e-10)
        torch.testing.assert_close(b["vb"], a["vb"])
    with pytest.raises(ValueError, match="loss_weighting"):
        GaussianDiffusion(loss_weighting="snr")
    respaced = create_diffusion("10", loss_weighting="min_snr", min_snr_gamma=2.0)
    assert respaced.loss_weighting == "min_snr" and respaced.min_snr_gamma == 2.0
