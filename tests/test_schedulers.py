"""sdrt's numpy schedulers against diffusers (the oracle), step by step on an analytic denoiser.

Fast tier, no weights: every scheduler name runs on SD1.5's PNDM config as ``from_config`` would
re-read it, across spacings, prediction types and step counts, plus config variants (Karras, solver
orders, PRK, zero-SNR, clip_sample, ...) and img2img. Both sides run closed loop: each feeds the
denoiser its own latents, so differences propagate as they would in a real pipeline.
"""

import inspect
import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch

from sdrt.runtime.schedulers import (SCHEDULER_NAMES, SCHEDULERS, SchedulerConfig, default_scheduler_name,
                                     make_sampler)
from sdrt.runtime.schedulers.config import CLASS_DEFAULTS

# Max |sdrt - diffusers| over every scaled UNet input and every latent, allowed per array as
# LATENT_ATOL + LATENT_RTOL * max|latent|. float32 rounds each operation to ~6e-8 of the largest values
# involved, and a CPU's SIMD path (AVX2, AVX-512) picks which rounding: unit-scale latents keep an absolute
# 1e-5, while latents that reach ~60 (sigma_max 14.6 x unit noise) or ~1.4e4 (zero terminal SNR,
# sigma_max 4096) may differ by a few ulps of their peak (1e-3 seen at 1.4e4 on an AMD EPYC).
LATENT_ATOL = 1e-5
LATENT_RTOL = 4 * float(np.finfo(np.float32).eps)  # 4 float32 ulps of the array's peak (4.8e-7)
# Timesteps and sigmas are float32 values computed by both sides through log/exp/interp, whose last bit
# depends on the CPU's SIMD path (Euler Karras timesteps: 565.8302 vs 565.83014, one ulp, on an AMD EPYC).
SCHEDULE_MAXULP = 4
SHAPE = (2, 4, 8, 8)

# diffusers' own numpy-2 deprecation (np.array on a torch tensor in set_timesteps), not sdrt's.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SD15_PNDM = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "prediction_type": "epsilon"}


def checkpoint(class_name="PNDMScheduler", config=None):
    """(diffusers scheduler as loaded from a checkpoint, the SchedulerConfig its scheduler.json gives)."""
    source = getattr(diffusers, class_name).from_config(SD15_PNDM if config is None else config)
    saved = {"class_name": class_name, "config": dict(source.config),
             "alphas_cumprod": source.alphas_cumprod.numpy().tolist()}
    return source, SchedulerConfig.from_json_dict(json.loads(json.dumps(saved)))


def make_denoiser(field, alphas_cumprod, prediction_type):
    """Smooth stand-in for the guided UNet: the ideal denoiser of Gaussian data x0 ~ N(field, 0.5^2),
    plus a small nonlinear error, reported as eps, v or x0. It keeps VP latents at unit scale, as a
    real UNet does; it sees only the UNet input and the (possibly fractional) timestep."""
    ac = alphas_cumprod.astype(np.float64)

    def denoiser(x, t):
        x64 = x.astype(np.float64)
        alpha = np.sqrt(np.interp(t, np.arange(len(ac)), ac))
        sigma = np.sqrt(1 - alpha**2)
        x0 = field + alpha * 0.25 / (alpha**2 * 0.25 + sigma**2) * (x64 - alpha * field)
        eps = (x64 - alpha * x0) / sigma + 0.05 * alpha * np.tanh(2 * x64) * np.cos(3 * t / 1000)
        x0 = (x64 - sigma * eps) / alpha if alpha > 0 else x0
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
        return out.astype(np.float32)

    return denoiser


def draws(seed, n):
    rng = np.random.default_rng(seed)
    x_T, x0, field = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3))
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(n + 10)]
    return x_T, 0.8 * x0, field, noises


def run_sdrt(name, config, n, strength, eta, seed, denoiser):
    x_T, x0, _, noises = draws(seed, n)
    s = make_sampler(name, config, n, strength=strength, eta=eta)
    x = s.add_noise(x0, x_T) if strength < 1 else x_T * s.init_noise_sigma
    inputs, latents, noised_at = [], [x], []
    for i, t in enumerate(s.timesteps):
        x_in = s.scale_model_input(x, i)
        noise = None
        if s.needs_noise(i):
            noised_at.append(i)
            noise = noises[i]
        x = s.step(denoiser(x_in, float(t)), i, x, noise=noise)
        inputs.append(x_in)
        latents.append(x)
    return s.timesteps, s.init_noise_sigma, inputs, latents, noised_at


def run_diffusers(sched, name, n, strength, eta, seed, denoiser, monkeypatch):
    """The StableDiffusion(Img2Img)Pipeline loop around the scheduler."""
    x_T, x0, _, noises = draws(seed, n)
    sched.set_timesteps(n)
    timesteps = sched.timesteps
    if strength < 1:
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(x_T), timesteps[:1])
    else:
        x = torch.from_numpy(x_T) * sched.init_noise_sigma
    current, noised_at = [0], []

    def injected_randn(shape, generator=None, device=None, dtype=None, layout=None):
        noised_at.append(current[0])
        return torch.from_numpy(noises[current[0]]).to(dtype)

    module = sys.modules[type(sched).__module__]
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", injected_randn)
    inputs, latents = [], [x.numpy()]
    for i, t in enumerate(timesteps):
        current[0] = i
        x_in = sched.scale_model_input(x, t)
        model_output = torch.from_numpy(denoiser(x_in.numpy(), float(t)))
        x = sched.step(model_output, t, x, **({"eta": eta} if name == "ddim" else {})).prev_sample
        inputs.append(x_in.numpy())
        latents.append(x.numpy())
    return timesteps.float().numpy(), float(sched.init_noise_sigma), inputs, latents, noised_at


def assert_schedule_equal(ours, theirs, err_msg=""):
    """Equal within SCHEDULE_MAXULP float32 ulps: a one-bit difference from libm/SIMD is not a different schedule."""
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, err_msg
    try:
        np.testing.assert_array_max_ulp(ours, theirs, maxulp=SCHEDULE_MAXULP)
    except AssertionError as e:
        raise AssertionError(f"{err_msg}: {e}\nsdrt      {ours}\ndiffusers {theirs}") from None


def latent_error(ours, theirs) -> float:
    """max |ours - theirs| in units of the allowed error for latents of that magnitude (<= 1 passes)."""
    return float(np.abs(ours - theirs).max()) / (LATENT_ATOL + LATENT_RTOL * float(np.abs(theirs).max()))


def max_error(name, source, config, n, monkeypatch, strength=1.0, eta=0.0, seed=0):
    """Run both, assert the schedule matches, return the max latent/input error relative to its tolerance."""
    spec = SCHEDULERS[name]
    sched = getattr(diffusers, spec.diffusers_class).from_config(source.config, **spec.overrides)
    denoiser = make_denoiser(draws(seed, n)[2] * 0.5, source.alphas_cumprod.numpy(), sched.config.prediction_type)
    ts, sigma0, inputs, latents, noised_at = run_sdrt(name, config, n, strength, eta, seed, denoiser)
    ref_ts, ref_sigma0, ref_inputs, ref_latents, ref_noised_at = run_diffusers(
        sched, name, n, strength, eta, seed, denoiser, monkeypatch)
    assert_schedule_equal(ts, ref_ts)
    assert sigma0 == pytest.approx(ref_sigma0, rel=1e-6, abs=0)
    assert noised_at == ref_noised_at
    assert len(latents) == len(ref_latents)
    errors = [latent_error(a, b) for a, b in zip(inputs + latents, ref_inputs + ref_latents)]
    assert all(np.isfinite(errors))
    return max(errors)


def check(name, source_class, source_config, n, monkeypatch, **kwargs):
    source, config = checkpoint(source_class, source_config)
    err = max_error(name, source, config, n, monkeypatch, **kwargs)
    assert err <= 1.0, f"{name} n={n} {kwargs}: max |sdrt - diffusers| = {err:.3g} x the latent tolerance"


# --- every name, SD1.5 config, spacing x prediction type x step count -----------------------------

SPACED = [name for name in SCHEDULER_NAMES if name != "lcm"]  # LCM has no spacing option


@pytest.mark.parametrize("n", [4, 7, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["class-default", "leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", SPACED)
def test_matches_diffusers(name, spacing, prediction_type, n, monkeypatch):
    config = {**SD15_PNDM, "prediction_type": prediction_type}
    if spacing != "class-default":
        config["timestep_spacing"] = spacing
    check(name, "PNDMScheduler", config, n, monkeypatch)


@pytest.mark.parametrize("n", [1, 2, 4, 7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_matches_diffusers(prediction_type, n, monkeypatch):
    check("lcm", "PNDMScheduler", {**SD15_PNDM, "prediction_type": prediction_type}, n, monkeypatch)


# --- config variants ------------------------------------------------------------------------------

DROP = object()  # a key the source config lacks
VARIANTS = [
    ("ddim", "PNDMScheduler", {"timestep_spacing": "trailing"}, {"eta": 1.0}),
    ("ddim", "PNDMScheduler", {}, {"eta": 0.5}),
    ("ddim", "PNDMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, {}),
    ("ddim", "PNDMScheduler", {"prediction_type": "sample"}, {}),
    ("pndm", "PNDMScheduler", {"skip_prk_steps": False}, {}),
    ("pndm", "DDIMScheduler", {"skip_prk_steps": DROP, "prediction_type": "v_prediction"}, {}),  # PRK by default
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "leading"}, {}),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, {}),
    ("euler", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "prediction_type": "sample"}, {}),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    ("lms", "PNDMScheduler", {"prediction_type": "sample"}, {}),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {"solver_order": 3}, {}),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {"solver_type": "heun", "prediction_type": "sample"}, {}),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, {}),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {"euler_at_final": True, "lambda_min_clipped": -5.1}, {}),
    ("dpmpp-2m", "UniPCMultistepScheduler", {"solver_type": "bh1"}, {}),  # bh1 -> midpoint
    ("dpmpp-2m-karras", "EulerDiscreteScheduler", {"sigma_min": 0.1}, {}),  # hidden sigma_min is read
    ("dpmpp-2m-karras", "DPMSolverMultistepScheduler", {"solver_order": 3, "lower_order_final": False}, {}),
    ("unipc", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
     {}),
    ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, {}),
    ("unipc", "UniPCMultistepScheduler", {"disable_corrector": [0, 2], "prediction_type": "sample"}, {}),
    ("unipc", "DPMSolverMultistepScheduler", {"solver_type": "heun", "use_karras_sigmas": True}, {}),
    ("lcm", "LCMScheduler", {"original_inference_steps": 100, "clip_sample": True}, {}),
    ("lcm", "LCMScheduler", {"timestep_scaling": 5.0, "prediction_type": "sample"}, {}),
]


@pytest.mark.parametrize("n", [5, 16])
@pytest.mark.parametrize(("name", "source_class", "changes", "kwargs"), VARIANTS,
                         ids=[f"{v[0]}-{v[1][:-9]}-{'-'.join(v[2])}" for v in VARIANTS])
def test_config_variants(name, source_class, changes, kwargs, n, monkeypatch):
    config = {k: v for k, v in {**SD15_PNDM, **changes}.items() if v is not DROP}
    check(name, source_class, config, n, monkeypatch, **kwargs)


def test_unipc_bh1_last_step_is_x0_where_diffusers_gives_nan(monkeypatch):
    """Disagreement: with bh1 and a zero final sigma diffusers returns x0 - alpha_t*B(h)*0 with
    B(h) = -inf, i.e. NaN, at the last step. sdrt returns the limit, x0 (what bh2 gives)."""
    source, config = checkpoint("UniPCMultistepScheduler", {**SD15_PNDM, "solver_type": "bh1"})
    sched = diffusers.UniPCMultistepScheduler.from_config(source.config)
    denoiser = make_denoiser(draws(0, 6)[2] * 0.5, source.alphas_cumprod.numpy(), "epsilon")
    _, _, _, latents, _ = run_sdrt("unipc", config, 6, 1.0, 0.0, 0, denoiser)
    _, _, _, ref_latents, _ = run_diffusers(sched, "unipc", 6, 1.0, 0.0, 0, denoiser, monkeypatch)
    assert max(latent_error(a, b) for a, b in zip(latents[:-1], ref_latents[:-1])) <= 1.0
    assert np.isnan(ref_latents[-1]).all() and np.isfinite(latents[-1]).all()


ZERO_SNR = {**SD15_PNDM, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
            "prediction_type": "v_prediction", "clip_sample": False}


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "unipc", "lcm"])
@pytest.mark.parametrize("source_class", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_zero_terminal_snr(name, source_class, monkeypatch):
    check(name, source_class, ZERO_SNR, 6, monkeypatch)


@pytest.mark.parametrize("name", ["pndm", "lms"])
def test_zero_terminal_snr_unsupported_by_class(name):
    _, config = checkpoint("DDIMScheduler", ZERO_SNR)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        make_sampler(name, config, 10)


# --- schedules alone, over many step counts ---------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedule_matches_diffusers(name, spacing):
    source, config = checkpoint(config={**SD15_PNDM, "timestep_spacing": spacing})
    spec = SCHEDULERS[name]
    for n in (1, 2, 3, 5, 10, 33, 50, 51, 100, 500):
        sched = getattr(diffusers, spec.diffusers_class).from_config(source.config, **spec.overrides)
        try:
            sched.set_timesteps(n)
        except ValueError:  # LCM beyond original_inference_steps
            with pytest.raises(ValueError):
                make_sampler(name, config, n)
            continue
        plan = make_sampler(name, config, n).plan
        assert_schedule_equal(plan.timesteps, sched.timesteps.float().numpy(), err_msg=f"n={n}")
        if hasattr(plan, "sigmas"):
            assert_schedule_equal(plan.sigmas, sched.sigmas.numpy(), err_msg=f"n={n}")


def test_dpm_karras_timesteps_unrounded_for_cosine_betas():
    """squaredcos_cap_v2 keeps fractional Karras timesteps (truncated by the int64 cast). Schedule only:
    the first timesteps repeat (999, 999, ...), which makes diffusers' own txt2img loop start at index 1."""
    source, config = checkpoint(config={**SD15_PNDM, "beta_schedule": "squaredcos_cap_v2"})
    sched = diffusers.DPMSolverMultistepScheduler.from_config(source.config, use_karras_sigmas=True)
    sched.set_timesteps(12)
    plan = make_sampler("dpmpp-2m-karras", config, 12).plan
    assert_schedule_equal(plan.timesteps, sched.timesteps.float().numpy())
    assert_schedule_equal(plan.sigmas, sched.sigmas.numpy())


# --- img2img --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(name, strength, n, monkeypatch):
    check(name, "PNDMScheduler", SD15_PNDM, n, monkeypatch, strength=strength)


def test_img2img_slices_the_schedule():
    _, config = checkpoint()
    full, cut = make_sampler("ddim", config, 50), make_sampler("ddim", config, 50, strength=0.75)
    assert len(cut) == 37 and cut.timesteps[0] == 721  # research notes 3.9
    np.testing.assert_array_equal(cut.timesteps, full.timesteps[13:])
    with pytest.raises(ValueError, match="no denoising step"):
        make_sampler("euler", config, 10, strength=0.05)


# --- names, config reading, API contract ----------------------------------------------------------

@pytest.mark.parametrize(("class_name", "changes", "expected"), [
    ("PNDMScheduler", {}, "pndm"), ("DDIMScheduler", {}, "ddim"), ("EulerDiscreteScheduler", {}, "euler"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
    ("EulerAncestralDiscreteScheduler", {}, "euler-a"), ("DPMSolverMultistepScheduler", {}, "dpmpp-2m"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp-2m-karras"),
    ("LMSDiscreteScheduler", {}, "lms"), ("LCMScheduler", {}, "lcm"), ("UniPCMultistepScheduler", {}, "unipc"),
])
def test_default_scheduler_name(class_name, changes, expected):
    _, config = checkpoint(class_name, {**SD15_PNDM, **changes})
    assert default_scheduler_name(config) == expected


def test_default_scheduler_name_rejects_unknown_class():
    _, config = checkpoint("HeunDiscreteScheduler")
    with pytest.raises(ValueError, match="no sdrt equivalent"):
        default_scheduler_name(config)


def test_class_defaults_match_diffusers_signatures():
    for class_name, defaults in CLASS_DEFAULTS.items():
        signature = inspect.signature(getattr(diffusers, class_name).__init__)
        assert defaults == {k: p.default for k, p in signature.parameters.items() if k != "self"}, class_name


@pytest.mark.parametrize("source_class", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                          "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_params_follow_from_config(source_class):
    """params_for(X) holds what X.from_config(checkpoint config).config holds, default keys included."""
    source, config = checkpoint(source_class, {**SD15_PNDM, "use_karras_sigmas": True, "clip_sample": False})
    for target in CLASS_DEFAULTS:
        ours = config.params_for(target)
        theirs = getattr(diffusers, target).from_config(source.config).config
        for key in CLASS_DEFAULTS[target]:
            if key != "solver_type":  # coerced inside __init__ (bh2 <-> midpoint); the plans coerce too
                assert ours[key] == theirs[key], (source_class, target, key)
    overridden = config.params_for("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})
    assert overridden["timestep_spacing"] == "trailing"


def test_step_contract():
    _, config = checkpoint()
    x = np.zeros(SHAPE, np.float32)
    s = make_sampler("euler-a", config, 5)
    assert all(s.needs_noise(i) for i in range(len(s)))
    with pytest.raises(ValueError, match="needs a standard-normal noise"):
        s.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step 0"):
        s.step(x, 1, x, noise=x)
    assert s.step(x, 0, x, noise=x).dtype == np.float32
    lcm = make_sampler("lcm", config, 4)
    assert [lcm.needs_noise(i) for i in range(4)] == [True, True, True, False]
    assert not make_sampler("ddim", config, 4).needs_noise(0)
    assert make_sampler("ddim", config, 4, eta=1.0).needs_noise(3)
    with pytest.raises(ValueError, match="eta applies to ddim only"):
        make_sampler("unipc", config, 4, eta=0.5)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_sampler("heun", config, 4)
    with pytest.raises(ValueError, match="predict_x0"):
        make_sampler("unipc", checkpoint("UniPCMultistepScheduler", {**SD15_PNDM, "predict_x0": False})[1], 4)


def test_runtime_imports_no_torch():
    code = ("import sys, sdrt.runtime.schedulers; "
            "assert not {'torch', 'diffusers', 'transformers', 'scipy'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)
