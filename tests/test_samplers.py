"""DDIM, PLMS and DPM-Solver++: parity with the original's golden samples, its timesteps, randomness and interface.

Golden tensors come from tests/fixtures (produced by the original CompVis code); the closed-form "fake" eps model
below keeps the many interface checks fast, while every parity check runs the tiny reference UNet.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import guided_eps
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from tests.conftest import assert_matches_reference

SAMPLERS = [DDIMSampler, PLMSSampler, DPMSolverSampler]
SHAPE = (4, 8, 8)
T = 1000


def fake_eps(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """A smooth eps that depends on x, the (fractional) timestep label and the conditioning."""
    if isinstance(cond, dict):
        cond = cond["c_crossattn"]
    if isinstance(cond, list):
        cond = torch.cat(cond, 1)
    shift = 0.0 if cond is None else cond.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
    t = t.to(x.dtype).view(-1, 1, 1, 1)
    return torch.tanh(0.5 * x + t / 700 + shift) * (1 + t / 1000)


class FakeModel:
    """The tiny model's schedule and stages with ``fake_eps`` in place of the UNet; records every UNet call."""

    def __init__(self, base):
        self._base = base
        self.calls: list[tuple[int, torch.Tensor, object]] = []

    def __getattr__(self, name):
        return getattr(self._base, name)

    def apply_model(self, x, t, cond):
        self.calls.append((x.shape[0], t.clone(), cond))
        return fake_eps(x, t, cond)


@pytest.fixture
def fake_model(tiny_model):
    return FakeModel(tiny_model)


def fake_cond(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 3, 5, generator=torch.Generator().manual_seed(seed))


def reference_run(sampler_cls, model, io, **kwargs):
    return sampler_cls(model).sample(S=10, conditioning=io["cond"], batch_size=2, shape=list(SHAPE),
                                     unconditional_guidance_scale=7.5, unconditional_conditioning=io["uncond"],
                                     eta=0.0, x_T=io["x_T"], verbose=False, **kwargs)


# ------------------------------------------------------------------------------------------ golden parity
def test_ddim_matches_reference(tiny_model, tiny_io):
    samples, intermediates = reference_run(DDIMSampler, tiny_model, tiny_io)
    assert_matches_reference(samples, tiny_io["ddim_s10_eta0"], "ddim_s10_eta0")
    # log_every_t=100 with 10 steps: x_T, then the first and the last step, as the original
    assert set(intermediates) == {"x_inter", "pred_x0"}
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 3
    assert torch.equal(intermediates["x_inter"][0], tiny_io["x_T"])
    assert torch.equal(intermediates["x_inter"][-1], samples)


def test_plms_matches_reference(tiny_model, tiny_io):
    samples, _ = reference_run(PLMSSampler, tiny_model, tiny_io)
    assert_matches_reference(samples, tiny_io["plms_s10"], "plms_s10")


def test_img2img_matches_reference(tiny_model, tiny_io):
    """strength 0.75 with 10 steps: t_enc = int(0.75 * 10) = 7, as the original's img2img script."""
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    t_enc = int(0.75 * 10)
    z_enc = sampler.stochastic_encode(tiny_io["z_scaled"], torch.tensor([t_enc] * 2), noise=tiny_io["img2img_noise"])
    assert_matches_reference(z_enc, tiny_io["img2img_z_enc"], "img2img_z_enc")
    out = sampler.decode(tiny_io["img2img_z_enc"], tiny_io["cond"], t_enc, unconditional_guidance_scale=7.5,
                         unconditional_conditioning=tiny_io["uncond"], verbose=False)
    assert_matches_reference(out, tiny_io["img2img_s10_strength075"], "img2img_s10_strength075")


# ------------------------------------------------------------------------------------------ DPM-Solver++
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs torch __array__, inside diffusers
def test_dpm_solver_matches_diffusers(tiny_model, tiny_io):
    """DPM-Solver++(2M) with guidance 7.5 on the tiny UNet equals diffusers' DPMSolverMultistepScheduler.

    What it proves: for S = 9 the original's continuous grid t_i = 1 - i (1 - 1/N) / S puts the UNet labels
    (t - 1/N) N exactly on 999, 888, ..., 111, 0, where its piecewise-linear log alpha is exactly
    0.5 log alphas_cumprod. There diffusers (algorithm_type "dpmsolver++", solver_order 2, "midpoint",
    lower_order_final, final_sigmas_type "sigma_min" = end at alphas_cumprod[0], linspace spacing) takes the
    same steps, so the data-prediction conversion, the first-order start, the 2M update and the first-order last
    step are checked against an independent implementation. Guidance here is two separate UNet passes.
    Fractional labels and the interpolation are covered by ``test_dpm_solver_matches_transcription``.
    """
    from diffusers import DPMSolverMultistepScheduler

    steps, scale = 9, 7.5
    ours, _ = DPMSolverSampler(tiny_model).sample(
        S=steps, conditioning=tiny_io["cond"], batch_size=2, shape=list(SHAPE), x_T=tiny_io["x_T"],
        unconditional_guidance_scale=scale, unconditional_conditioning=tiny_io["uncond"], verbose=False)

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=tiny_model.betas.numpy(), solver_order=2, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="sigma_min", timestep_spacing="linspace")
    scheduler.alphas_cumprod = tiny_model.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -111))
    x = tiny_io["x_T"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            labels = torch.full((2,), float(t))
            eps_uncond = tiny_model.apply_model(x, labels, tiny_io["uncond"])
            eps_cond = tiny_model.apply_model(x, labels, tiny_io["cond"])
            x = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, x).prev_sample
    assert_matches_reference(ours, x, "dpm_solver_s9")


def transcribed_dpm_solver_pp(eps_model, x: torch.Tensor, steps: int, alphas_cumprod: np.ndarray,
                              lower_order_final: bool = True) -> torch.Tensor:
    """The original's DPM_Solver.sample(method="multistep", order=2, skip_type="time_uniform", predict_x0=True,
    lower_order_final=True) written out from its equations in float64 (np.interp for log alpha)."""
    n = len(alphas_cumprod)
    keys, log_alpha_keys = np.linspace(0.0, 1.0, n + 1)[1:], 0.5 * np.log(alphas_cumprod.astype(np.float64))

    def log_alpha(t):
        return float(np.interp(t, keys, log_alpha_keys))

    def alpha(t):
        return np.exp(log_alpha(t))

    def sigma(t):
        return np.sqrt(1.0 - np.exp(2.0 * log_alpha(t)))

    def lam(t):
        return log_alpha(t) - 0.5 * np.log(1.0 - np.exp(2.0 * log_alpha(t)))

    def data_prediction(x, t):
        label = torch.full((x.shape[0],), (t - 1.0 / n) * 1000.0, dtype=torch.float64)
        return (x - sigma(t) * eps_model(x, label)) / alpha(t)

    def first_order(x, s, t, m_s):  # DPM-Solver-1 in data prediction form (= DDIM)
        h = lam(t) - lam(s)
        return sigma(t) / sigma(s) * x - alpha(t) * np.expm1(-h) * m_s

    def second_order(x, m_prev, t_prev, t):  # multistep DPM-Solver++(2M), solver_type "dpm_solver"
        (m1, m0), (t1, t0) = m_prev, t_prev
        h_0, h = lam(t0) - lam(t1), lam(t) - lam(t0)
        d1 = (m0 - m1) / (h_0 / h)
        phi = np.exp(-h) - 1.0
        return sigma(t) / sigma(t0) * x - alpha(t) * phi * m0 - 0.5 * alpha(t) * phi * d1

    times = np.linspace(1.0, 1.0 / n, steps + 1)
    x = x.double()
    m_prev, t_prev = [data_prediction(x, times[0])], [times[0]]
    x = first_order(x, times[0], times[1], m_prev[-1])
    m_prev.append(data_prediction(x, times[1]))
    t_prev.append(times[1])
    for step in range(2, steps + 1):
        order = min(2, steps + 1 - step) if lower_order_final and steps < 15 else 2
        if order == 1:
            x = first_order(x, t_prev[-1], times[step], m_prev[-1])
        else:
            x = second_order(x, m_prev, t_prev, times[step])
        m_prev, t_prev = [m_prev[-1], None], [t_prev[-1], times[step]]
        if step < steps:
            m_prev[-1] = data_prediction(x, times[step])
    return x


@pytest.mark.parametrize("steps", [2, 10, 14, 15, 20])
def test_dpm_solver_matches_transcription(fake_model, steps):
    """DPM-Solver++ equals a float64 transcription of the original's equations, on fractional UNet labels.

    What it proves: the time grid, the piecewise-linear log alpha, the label (t - 1/N) * 1000 the UNet sees, the
    first-order start, the 2M update and the lower-order final step (only below 15 steps) are the original's.
    The same comparison with lower_order_final switched off fails below 15 steps, so the check can fail.
    """
    cond = fake_cond(2)
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    ours, _ = DPMSolverSampler(fake_model).sample(S=steps, conditioning=cond, batch_size=2, shape=SHAPE, x_T=x_T,
                                                  verbose=False)
    assert len(fake_model.calls) == steps
    alphas_cumprod = fake_model.alphas_cumprod.numpy()
    reference = transcribed_dpm_solver_pp(lambda x, t: fake_eps(x, t, cond.double()), x_T, steps, alphas_cumprod)
    assert_matches_reference(ours, reference.float(), f"dpm_solver_s{steps}")
    if steps < 15:
        other = transcribed_dpm_solver_pp(lambda x, t: fake_eps(x, t, cond.double()), x_T, steps, alphas_cumprod,
                                          lower_order_final=False)
        with pytest.raises(AssertionError):
            assert_matches_reference(ours, other.float())


def test_dpm_solver_single_step(fake_model):
    """S = 1 (an assertion error in the original) is one first-order step from t = 1 to 1/N."""
    samples, _ = DPMSolverSampler(fake_model).sample(S=1, batch_size=1, shape=SHAPE, conditioning=fake_cond(1),
                                                     verbose=False)
    assert samples.shape == (1, *SHAPE) and torch.isfinite(samples).all()
    assert len(fake_model.calls) == 1


# ------------------------------------------------------------------------------------------ randomness
def transcribed_ddim(eps_model, x: torch.Tensor, steps: int, eta: float, alphas_cumprod: torch.Tensor):
    """The original's DDIM loop (uniform timesteps, p_sample_ddim) in float64, drawing noise as it does."""
    ac = alphas_cumprod.double()
    timesteps = np.arange(0, T, T // steps) + 1
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    x = x.double()
    for i, step in enumerate(np.flip(timesteps)):
        index = steps - i - 1
        eps = eps_model(x, torch.full((x.shape[0],), int(step)))
        x0 = (x - (1 - alphas[index]).sqrt() * eps) / alphas[index].sqrt()
        noise = sigmas[index] * torch.randn(x.shape)
        x = alphas_prev[index].sqrt() * x0 + (1 - alphas_prev[index] - sigmas[index] ** 2).sqrt() * eps + noise
    return x


def test_ddim_eta_draws_noise_as_the_original(fake_model):
    """eta > 0: x_T from torch.randn(shape) and one normal draw per step give the original's numbers for a seed."""
    cond = fake_cond(2)
    torch.manual_seed(123)
    ours, _ = DDIMSampler(fake_model).sample(S=5, batch_size=2, shape=SHAPE, conditioning=cond, eta=0.7,
                                             verbose=False)
    after_ours = torch.randn(3)
    torch.manual_seed(123)
    x_T = torch.randn(2, *SHAPE)
    reference = transcribed_ddim(lambda x, t: fake_eps(x, t, cond.double()), x_T, 5, 0.7, fake_model.alphas_cumprod)
    assert_matches_reference(ours, reference.float(), "ddim_eta07")
    assert torch.equal(after_ours, torch.randn(3)), "the generator must end in the original's state"


@pytest.mark.parametrize(("sampler_cls", "draws"), [(DDIMSampler, 4), (PLMSSampler, 5), (DPMSolverSampler, 0)])
def test_generator_state_after_sampling(fake_model, sampler_cls, draws):
    """With x_T given and eta = 0 the original still draws one noise tensor per DDIM update (PLMS: S + 1, its
    first step updates twice); later draws in a script (the next batch's x_T) depend on that."""
    x_T = torch.randn(2, *SHAPE)
    torch.manual_seed(7)
    sampler_cls(fake_model).sample(S=4, batch_size=2, shape=SHAPE, conditioning=fake_cond(2), x_T=x_T,
                                   verbose=False)
    after = torch.randn(3)
    torch.manual_seed(7)
    for _ in range(draws):
        torch.randn(2, *SHAPE)
    assert torch.equal(after, torch.randn(3))


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_seed_reproduces(fake_model, sampler_cls):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(sampler_cls(fake_model).sample(S=3, batch_size=2, shape=SHAPE, conditioning=fake_cond(2),
                                                   verbose=False)[0])
    torch.manual_seed(3)
    given = sampler_cls(fake_model).sample(S=3, batch_size=2, shape=SHAPE, conditioning=fake_cond(2),
                                           x_T=torch.randn(2, *SHAPE), verbose=False)[0]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], given)


# ------------------------------------------------------------------------------------------ guidance
def test_guidance_is_one_batched_unet_call(tiny_model, tiny_io):
    """eps_u + s (eps_c - eps_u) from one UNet call on [x, x] with [uncond, cond] equals two separate passes."""
    x, t, cond, uncond = tiny_io["unet_x"], tiny_io["unet_t"], tiny_io["cond"], tiny_io["uncond"]
    with torch.no_grad():
        eps_uncond, eps_cond = tiny_model.apply_model(x, t, uncond), tiny_model.apply_model(x, t, cond)
        guided = guided_eps(tiny_model, x, t, cond, uncond, 7.5)
    assert_matches_reference(guided, eps_uncond + 7.5 * (eps_cond - eps_uncond), "guided eps")


@pytest.mark.parametrize(("sampler_cls", "calls"), [(DDIMSampler, 4), (PLMSSampler, 5), (DPMSolverSampler, 4)])
def test_guidance_batches_uncond_first(fake_model, sampler_cls, calls):
    cond, uncond = fake_cond(2), fake_cond(2, seed=1)
    sampler_cls(fake_model).sample(S=4, batch_size=2, shape=SHAPE, conditioning=cond, verbose=False,
                                   unconditional_guidance_scale=5.0, unconditional_conditioning=uncond)
    assert len(fake_model.calls) == calls
    for rows, t, c in fake_model.calls:
        assert rows == 4 and torch.equal(t[:2], t[2:])
        assert torch.equal(c, torch.cat([uncond, cond]))


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_scale_one_or_no_uncond_skips_the_unconditional_pass(fake_model, scale):
    cond = fake_cond(2)
    uncond = fake_cond(2, seed=1) if scale == 1.0 else None
    DDIMSampler(fake_model).sample(S=3, batch_size=2, shape=SHAPE, conditioning=cond, verbose=False,
                                   unconditional_guidance_scale=scale, unconditional_conditioning=uncond)
    assert [rows for rows, _, _ in fake_model.calls] == [2, 2, 2]


@pytest.mark.parametrize("wrap", [lambda c: [c], lambda c: {"c_crossattn": [c]}])
def test_list_and_dict_conditioning(fake_model, wrap):
    cond, uncond, x_T = fake_cond(2), fake_cond(2, seed=1), torch.randn(2, *SHAPE)

    def run(c, uc):
        return DDIMSampler(fake_model).sample(S=3, batch_size=2, shape=SHAPE, conditioning=c, x_T=x_T, verbose=False,
                                              unconditional_guidance_scale=3.0, unconditional_conditioning=uc)[0]

    assert torch.equal(run(wrap(cond), wrap(uncond)), run(cond, uncond))


# ------------------------------------------------------------------------------------------ batches
def test_partial_last_batch(fake_model):
    """A conditioning with fewer rows than batch_size (the last chunk of a prompt file) makes that many samples,
    from the first rows of x_T and of the unconditional conditioning."""
    cond, uncond, x_T = fake_cond(2), fake_cond(3, seed=1), torch.randn(3, *SHAPE)
    with pytest.warns(UserWarning, match="Got 2 conditionings but batch-size is 3"):
        partial, _ = DDIMSampler(fake_model).sample(S=3, batch_size=3, shape=SHAPE, conditioning=cond, x_T=x_T,
                                                    unconditional_guidance_scale=4.0,
                                                    unconditional_conditioning=uncond, verbose=False)
    full, _ = DDIMSampler(fake_model).sample(S=3, batch_size=2, shape=SHAPE, conditioning=cond, x_T=x_T[:2],
                                             unconditional_guidance_scale=4.0, unconditional_conditioning=uncond[:2],
                                             verbose=False)
    assert torch.equal(partial, full)


def test_single_conditioning_row_is_shared(fake_model):
    x_T = torch.randn(3, *SHAPE)
    with pytest.warns(UserWarning, match="Got 1 conditionings"):
        shared, _ = PLMSSampler(fake_model).sample(S=3, batch_size=3, shape=SHAPE, conditioning=fake_cond(1),
                                                   x_T=x_T, verbose=False)
    repeated, _ = PLMSSampler(fake_model).sample(S=3, batch_size=3, shape=SHAPE,
                                                 conditioning=fake_cond(1).repeat(3, 1, 1), x_T=x_T, verbose=False)
    assert torch.equal(shared, repeated)


def test_mismatched_unconditional_rows_is_a_clear_error(fake_model):
    with pytest.raises(ValueError, match="unconditional_conditioning has 2 rows but 3"):
        DDIMSampler(fake_model).sample(S=2, batch_size=3, shape=SHAPE, conditioning=fake_cond(3), verbose=False,
                                       unconditional_guidance_scale=2.0, unconditional_conditioning=fake_cond(2))


# ------------------------------------------------------------------------------------------ timesteps
def original_make_ddim_timesteps(method: str, steps: int) -> np.ndarray:
    """The original's formula (ldm/modules/diffusionmodules/util.py), transcribed."""
    if method == "uniform":
        return np.asarray(list(range(0, T, T // steps))) + 1
    return ((np.linspace(0, np.sqrt(T * 0.8), steps)) ** 2).astype(int) + 1


@pytest.mark.parametrize("method", ["uniform", "quad"])
def test_timesteps_for_every_step_count(method):
    """Every S in 1..1000 gives strictly increasing timesteps that index alphas_cumprod (0..999): the original's
    exactly where those are valid, otherwise exactly S of them."""
    repaired = []
    for steps in range(1, T + 1):
        ours = make_ddim_timesteps(method, steps, T, verbose=False)
        original = original_make_ddim_timesteps(method, steps)
        assert ours.dtype == np.int64
        assert ours[0] >= 0 and ours[-1] <= T - 1 and (np.diff(ours) > 0).all(), steps
        if original[-1] <= T - 1 and (np.diff(original) > 0).all():
            assert np.array_equal(ours, original), steps
        else:
            assert len(ours) == steps, steps
            repaired.append(steps)
    if method == "uniform":
        expected = [3, 9, 27, 36, 37, *range(101, 112), *range(251, 334), *range(501, 1001)]
        assert repaired == expected
    else:
        assert repaired == list(range(30, 1001))


def test_timesteps_where_the_original_crashes():
    assert make_ddim_timesteps("uniform", 3, T, verbose=False).tolist() == [1, 334, 667]
    assert make_ddim_timesteps("uniform", 101, T, verbose=False)[-1] == 991
    assert make_ddim_timesteps("uniform", 1000, T, verbose=False).tolist() == list(range(T))
    assert make_ddim_timesteps("uniform", 10, T, verbose=False).tolist() == list(range(1, 902, 100))
    assert len(make_ddim_timesteps("uniform", 334, T, verbose=False)) == 500  # the original's extra steps, kept


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_make_schedule_for_every_step_count(fake_model, sampler_cls):
    sampler = sampler_cls(fake_model)
    for steps in range(1, T + 1):
        sampler.make_schedule(ddim_num_steps=steps, verbose=False)
        if sampler_cls is DPMSolverSampler:
            assert len(sampler.timesteps) == steps + 1
        else:
            assert torch.isfinite(sampler.ddim_alphas).all() and torch.isfinite(sampler.ddim_sigmas).all()


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
@pytest.mark.parametrize("steps", [0, T + 1])
def test_step_count_out_of_range(fake_model, sampler_cls, steps):
    with pytest.raises(ValueError, match="between 1 and 1000"):
        sampler_cls(fake_model).sample(S=steps, batch_size=1, shape=SHAPE, verbose=False)


@pytest.mark.parametrize("steps", [3, 1000])
def test_ddim_runs_where_the_original_crashes(fake_model, steps):
    samples, _ = DDIMSampler(fake_model).sample(S=steps, batch_size=1, shape=SHAPE, conditioning=fake_cond(1),
                                                eta=1.0, verbose=False)
    assert torch.isfinite(samples).all()
    assert [int(t[0]) for _, t, _ in fake_model.calls] == make_ddim_timesteps("uniform", steps, T, False)[::-1].tolist()


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_one_step(fake_model, sampler_cls):
    samples, _ = sampler_cls(fake_model).sample(S=1, batch_size=1, shape=SHAPE, conditioning=fake_cond(1),
                                                verbose=False)
    assert torch.isfinite(samples).all()
    assert len(fake_model.calls) == (2 if sampler_cls is PLMSSampler else 1)


def test_dpm_solver_quad_times(fake_model):
    sampler = DPMSolverSampler(fake_model)
    sampler.make_schedule(ddim_num_steps=5, ddim_discretize="quad", verbose=False)
    times = sampler.timesteps
    torch.testing.assert_close(times, torch.linspace(1.0, 1e-3 ** 0.5, 6) ** 2)
    assert sampler.ddim_timesteps[-1] == pytest.approx(999.0, abs=1e-3)


@pytest.mark.parametrize("sampler_cls", [PLMSSampler, DPMSolverSampler])
def test_eta_must_be_zero(fake_model, sampler_cls):
    with pytest.raises(ValueError, match="eta must be 0"):
        sampler_cls(fake_model).sample(S=3, batch_size=1, shape=SHAPE, eta=0.5, verbose=False)


# ------------------------------------------------------------------------------------------ img2img
@pytest.mark.parametrize("sampler_cls", SAMPLERS)
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.5, 1.0])
def test_img2img_every_sampler_every_strength(fake_model, sampler_cls, strength):
    steps = 10
    sampler = sampler_cls(fake_model)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=0.0, verbose=False)
    t_enc = int(strength * steps)
    z0 = torch.randn(2, *SHAPE)
    z_enc = sampler.stochastic_encode(z0, torch.tensor([t_enc] * 2))
    out = sampler.decode(z_enc, fake_cond(2), t_enc, verbose=False)
    assert out.shape == z0.shape and torch.isfinite(out).all()
    expected_calls = t_enc + 1 if sampler_cls is PLMSSampler and t_enc else t_enc
    assert len(fake_model.calls) == expected_calls
    if t_enc == 0:
        assert torch.equal(out, z_enc)


def test_strength_one_encodes_to_the_last_timestep(fake_model):
    sampler = DDIMSampler(fake_model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    z0, noise = torch.randn(1, *SHAPE), torch.randn(1, *SHAPE)
    z_enc = sampler.stochastic_encode(z0, 10, noise=noise)
    a = fake_model.alphas_cumprod[-1]
    torch.testing.assert_close(z_enc, a.sqrt() * z0 + (1 - a).sqrt() * noise)
    with pytest.raises(ValueError, match="t must be between 0 and 10"):
        sampler.stochastic_encode(z0, 11)
    with pytest.raises(ValueError, match="t_start must be between 0 and 10"):
        sampler.decode(z_enc, fake_cond(1), 11)


def test_dpm_solver_img2img_from_full_strength_is_sampling(fake_model):
    """DPM-Solver's encode level for t is where decode(t) starts, so full strength from pure noise is sampling."""
    sampler = DPMSolverSampler(fake_model)
    x_T, cond = torch.randn(2, *SHAPE), fake_cond(2)
    sampled, _ = sampler.sample(S=6, batch_size=2, shape=SHAPE, conditioning=cond, x_T=x_T, verbose=False)
    decoded = sampler.decode(x_T, cond, 6, verbose=False)
    assert torch.equal(sampled, decoded)


def test_decode_needs_a_schedule(fake_model):
    with pytest.raises(ValueError, match="call make_schedule"):
        DDIMSampler(fake_model).decode(torch.zeros(1, *SHAPE), fake_cond(1), 1)


# ------------------------------------------------------------------------------------------ interface
def test_mask_of_zeros_changes_nothing(fake_model):
    x_T, cond = torch.randn(2, *SHAPE), fake_cond(2)
    plain, _ = DDIMSampler(fake_model).sample(S=4, batch_size=2, shape=SHAPE, conditioning=cond, x_T=x_T,
                                              verbose=False)
    masked, _ = DDIMSampler(fake_model).sample(S=4, batch_size=2, shape=SHAPE, conditioning=cond, x_T=x_T,
                                               mask=torch.zeros(1, 1, 8, 8), x0=torch.randn(2, *SHAPE),
                                               verbose=False)
    assert torch.equal(plain, masked)
    with pytest.raises(ValueError, match="mask needs x0"):
        DDIMSampler(fake_model).sample(S=2, batch_size=1, shape=SHAPE, mask=torch.ones(1, 1, 8, 8), verbose=False)


def test_callbacks(fake_model):
    steps, seen = [], []
    PLMSSampler(fake_model).sample(S=4, batch_size=1, shape=SHAPE, conditioning=fake_cond(1), verbose=False,
                                   callback=steps.append, img_callback=lambda x0, i: seen.append(x0.shape))
    assert steps == [0, 1, 2, 3] and seen == [(1, *SHAPE)] * 4


def test_quantize_x0_needs_a_vq_first_stage(fake_model):
    with pytest.raises(ValueError, match="VQ first stage"):
        DDIMSampler(fake_model).sample(S=2, batch_size=1, shape=SHAPE, quantize_x0=True, verbose=False)


def test_unknown_arguments_warn(fake_model):
    with pytest.warns(UserWarning, match="ignores unknown arguments"):
        DDIMSampler(fake_model).sample(S=1, batch_size=1, shape=SHAPE, conditioning=fake_cond(1), verbose=False,
                                       ddim_use_original_steps=True)


@pytest.mark.parametrize(("sampler_cls", "desc"), [(DDIMSampler, "DDIM Sampler"), (PLMSSampler, "PLMS Sampler")])
def test_progress_output(fake_model, capsys, sampler_cls, desc):
    sampler_cls(fake_model).sample(S=3, batch_size=1, shape=SHAPE, conditioning=fake_cond(1), verbose=False)
    assert capsys.readouterr() == ("", "")
    sampler_cls(fake_model).sample(S=3, batch_size=1, shape=SHAPE, conditioning=fake_cond(1))
    out, err = capsys.readouterr()
    assert f"Running {desc.split()[0]} Sampling with 3 timesteps" in out
    assert desc in err and "3/3" in err


def test_buffers_follow_the_model_and_x_its_dtype(fake_model):
    """Buffers are float32 on the model's device; x stays in the UNet's dtype (bfloat16 here)."""
    class HalfModel(FakeModel):
        model = torch.nn.Linear(1, 1).to(torch.bfloat16)

        def apply_model(self, x, t, cond):
            assert x.dtype == torch.bfloat16
            return super().apply_model(x, t, cond).to(torch.bfloat16)

    sampler = DDIMSampler(HalfModel(fake_model._base))
    samples, _ = sampler.sample(S=3, batch_size=1, shape=SHAPE, conditioning=fake_cond(1), verbose=False,
                                mask=torch.full((1, 1, 8, 8), 0.5), x0=torch.randn(1, *SHAPE))
    assert samples.dtype == torch.bfloat16
    for name in ("ddim_alphas", "ddim_alphas_prev", "ddim_sigmas", "ddim_sqrt_one_minus_alphas", "alphas_cumprod"):
        buffer = getattr(sampler, name)
        assert buffer.dtype == torch.float32 and buffer.device == fake_model.betas.device, name


def test_original_attributes(fake_model):
    sampler = DDIMSampler(fake_model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    ac = fake_model.alphas_cumprod
    assert isinstance(sampler.ddim_timesteps, np.ndarray)
    assert torch.equal(sampler.ddim_alphas, ac[sampler.ddim_timesteps])
    assert torch.equal(sampler.ddim_alphas_prev[1:], ac[sampler.ddim_timesteps[:-1]])
    assert sampler.ddim_alphas_prev[0] == ac[0] and not sampler.ddim_sigmas.any()


def test_sample_log_uses_ddim(tiny_model, tiny_io):
    """LatentDiffusion.sample_log calls DDIMSampler(self).sample(steps, batch_size, shape, cond, verbose=False)."""
    samples, intermediates = tiny_model.sample_log(cond=tiny_io["cond"], batch_size=2, ddim=True, ddim_steps=2,
                                                   eta=1.0)
    assert samples.shape == (2, *SHAPE) and "pred_x0" in intermediates
