"""Train the embedded demo model (a tiny Stable Diffusion 1.x) and its "sks" LoRA, on one CPU thread.

Stages (each reads the previous one's output, so each can be rerun alone with the same result):

1. `vae`:  AutoencoderKL on procedural pictures (64x64 RGB <-> 8x8x4 latents); L1 + MSE reconstruction and a
   small KL term. Its scaling_factor is then set to 1/std of the latents of the training set, the way
   SD's 0.18215 came about, and recorded in vae/config.json.
2. `base`: the CLIPTextModel (from scratch, real CLIP BPE vocabulary) and the UNet2DConditionModel, jointly,
   on the DDPM noise schedule of SD 1.x with the epsilon objective; captions are dropped 10% of the time for
   classifier-free guidance; EMA weights are shipped. Writes the diffusers folder (`--out`, default `demo/`)
   with `StableDiffusionPipeline.save_pretrained` and the SD 1.5 tokenizer files.
3. `lora`: a rank-8 LoRA on the frozen model (UNet to_q/to_k/to_v/to_out.0, text encoder q/k/v/out_proj) that
   teaches "sks" = a ring, a shape the base set never shows; a quarter of each batch is base data (prior
   preservation). Writes `<out>/lora/sks_kohya.safetensors` in the kohya-ss format.

`all` runs the three. Seeds are fixed and torch uses one thread (the machine's other core stays free), so a
rerun reproduces the weights. Progress goes to `<work>/train.log`.

    python -m training.train all --out demo --work /tmp/sdrt_train
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import lora, models, shapes
from training.tokenizer import MAX_LENGTH, fetch_bpe, write_tokenizer_files

log = logging.getLogger("training")

SEED = 20240601
DATASET_SIZE = 16384
UNCOND_PROB = 0.1  # caption dropout for classifier-free guidance
EMA_DECAY = 0.999
CHECKPOINT_EVERY = 1000


@dataclass(frozen=True)
class StageSettings:
    """Optimisation settings of one stage."""

    steps: int
    batch: int
    lr: float
    warmup: int = 100


VAE = StageSettings(steps=2400, batch=16, lr=2e-3)
BASE = StageSettings(steps=5000, batch=64, lr=1e-3, warmup=200)
LORA = StageSettings(steps=1200, batch=64, lr=4e-3, warmup=50)
KL_WEIGHT = 1e-6
# Share of concept pictures in a LoRA batch; the rest is base data, so base words keep their meaning.
LORA_CONCEPT_FRACTION = 0.75


def lr_lambda(s: StageSettings):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def f(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        p = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    return f


def images_tensor(samples: list[shapes.Sample]) -> torch.Tensor:
    """uint8 HWC pictures -> float NCHW in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def train_vae(work: Path, cfg: models.DemoConfig) -> None:
    """Stage 1: the autoencoder, then its scaling factor from the latent std."""
    torch.manual_seed(SEED)
    x_all = images_tensor(shapes.dataset(DATASET_SIZE, SEED))
    vae = models.build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(VAE))
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(VAE.steps):
        x = x_all[torch.randint(0, len(x_all), (VAE.batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + F.l1_loss(rec, x) + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == VAE.steps - 1:
            log.info(
                "vae step %d/%d  mse %.5f  kl %.1f  %.0fs", step, VAE.steps, mse.item(), kl.item(), time.time() - t0
            )
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, 2048, 256)])
    # SD's 0.18215 is 1/std of the first-stage latents of a training batch; same recipe here.
    scaling = round(1.0 / mean.std().item(), 5)
    vae.register_to_config(scaling_factor=scaling)
    log.info("vae done: latent std %.4f -> scaling_factor %.5f  %.0fs", mean.std().item(), scaling, time.time() - t0)
    vae.save_pretrained(work / "vae", safe_serialization=True)


def load_tokenizer(path: Path):
    """transformers' CLIPTokenizer from the SD 1.5 file set (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Pad to 77 with <|endoftext|>, as StableDiffusionPipeline does."""
    return tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def encode_latents(vae, samples: list[shapes.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every picture, computed once; training draws latents from them."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(samples), 256):
            post = vae.encode(images_tensor(samples[i : i + 256])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def ddpm_scheduler():
    """The training noise schedule: SD 1.x's scaled_linear betas, 1000 steps, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(models.build_scheduler().config)


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        for pe, p in zip(self.module.parameters(), module.parameters()):
            pe.lerp_(p, 1.0 - decay)


def diffusion_loss(unet, text_encoder, scheduler, latents, ids, gen) -> torch.Tensor:
    """Epsilon objective at uniformly drawn timesteps (DDPM training, Ho et al. 2020 eq. 14)."""
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    hidden = text_encoder(ids).last_hidden_state
    return F.mse_loss(unet(noisy, t, hidden).sample, noise)


def draw_latents(mean, std, idx, scaling, gen) -> torch.Tensor:
    """A posterior sample times the VAE scaling factor, as SD training does."""
    return (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling


def train_base(work: Path, out: Path, cfg: models.DemoConfig, bpe: Path) -> None:
    """Stage 2: text encoder and UNet jointly; writes the shipped diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    write_tokenizer_files(bpe, work / "tokenizer")
    tokenizer = load_tokenizer(work / "tokenizer")
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    samples = shapes.dataset(DATASET_SIZE, SEED)
    t0 = time.time()
    mean, std = encode_latents(vae, samples)
    ids_all = tokenize(tokenizer, [s.caption for s in samples])
    uncond = tokenize(tokenizer, [""])[0]
    log.info("base: %d latents and captions ready  %.0fs", len(samples), time.time() - t0)

    text_encoder, unet = models.build_text_encoder(cfg), models.build_unet(cfg)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=BASE.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(BASE))
    ema_te, ema_unet = Ema(text_encoder), Ema(unet)
    noise_sched = ddpm_scheduler()
    scaling = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(SEED + 1)
    for step in range(BASE.steps):
        idx = torch.randint(0, len(samples), (BASE.batch,), generator=gen)
        ids = ids_all[idx].clone()
        ids[torch.rand(BASE.batch, generator=gen) < UNCOND_PROB] = uncond
        loss = diffusion_loss(unet, text_encoder, noise_sched, draw_latents(mean, std, idx, scaling, gen), ids, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_te.update(text_encoder, step)
        ema_unet.update(unet, step)
        if step % 100 == 0 or step == BASE.steps - 1:
            log.info("base step %d/%d  loss %.4f  %.0fs", step, BASE.steps, loss.item(), time.time() - t0)
        if step % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 and step < BASE.steps - 1:
            # Lets `training.evaluate --model <work>/base_checkpoint` watch a long run; not needed to resume.
            save_pipeline(vae, ema_te.module, tokenizer, ema_unet.module, work / "base_checkpoint", bpe)
    save_pipeline(vae, ema_te.module, tokenizer, ema_unet.module, out, bpe)
    log.info("base done: wrote %s  %.0fs", out, time.time() - t0)


def save_pipeline(vae, text_encoder, tokenizer, unet, out: Path, bpe: Path) -> None:
    """The diffusers folder as StableDiffusionPipeline writes it, with the SD 1.5 tokenizer file set."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=models.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # vocab.json + merges.txt as in stable-diffusion-v1-5, instead of transformers' tokenizer.json.
    shutil.rmtree(out / "tokenizer")
    write_tokenizer_files(bpe, out / "tokenizer")
    prefix_text_model_keys(out / "text_encoder" / "model.safetensors")
    drop_source_path(out / "vae" / "config.json")
    for f in out.rglob("*.safetensors"):
        f.chmod(0o644)


def drop_source_path(config: Path) -> None:
    """Remove `_name_or_path` (the scratch folder the VAE was loaded from) so the folder does not depend on it."""
    data = json.loads(config.read_text("utf-8"))
    data.pop("_name_or_path", None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


def prefix_text_model_keys(path: Path) -> None:
    """Store the text encoder under the `text_model.` key names of real SD 1.x checkpoints.

    transformers 5 saves CLIPTextModel without that prefix (and strips it when loading), transformers 4
    expects it; with the prefix both load the folder.
    """
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    save_file(
        {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()},
        str(path),
        metadata={"format": "pt"},
    )


def train_lora(out: Path) -> None:
    """Stage 3: the "sks" (ring) LoRA on the frozen shipped model."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(SEED + 2)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    n = DATASET_SIZE // 4
    samples = shapes.dataset(n, SEED + 2, (shapes.LORA_SHAPE,)) + shapes.dataset(n, SEED + 3)
    t0 = time.time()
    mean, std = encode_latents(vae, samples)
    ids_all = tokenize(pipe.tokenizer, [s.caption for s in samples])
    uncond = tokenize(pipe.tokenizer, [""])[0]
    adapter = lora.LoraAdapter(unet, text_encoder, rank=lora.RANK, alpha=lora.ALPHA, seed=SEED + 2)
    opt = torch.optim.AdamW(adapter.parameters(), lr=LORA.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(LORA))
    noise_sched = ddpm_scheduler()
    scaling = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(SEED + 2)
    n_concept = round(LORA.batch * LORA_CONCEPT_FRACTION)
    for step in range(LORA.steps):
        idx = torch.cat(
            [
                torch.randint(0, n, (n_concept,), generator=gen),
                torch.randint(n, 2 * n, (LORA.batch - n_concept,), generator=gen),
            ]
        )
        ids = ids_all[idx].clone()
        ids[torch.rand(LORA.batch, generator=gen) < UNCOND_PROB] = uncond
        loss = diffusion_loss(unet, text_encoder, noise_sched, draw_latents(mean, std, idx, scaling, gen), ids, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == LORA.steps - 1:
            log.info("lora step %d/%d  loss %.4f  %.0fs", step, LORA.steps, loss.item(), time.time() - t0)
    path = out / "lora" / "sks_kohya.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    lora.save_kohya(adapter.state_dict_kohya(), path)
    path.chmod(0o644)
    adapter.remove()
    log.info("lora done: wrote %s  %.0fs", path, time.time() - t0)


def setup_logging(work: Path) -> None:
    """Log to stdout and to <work>/train.log."""
    work.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(work / "train.log")):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["vae", "base", "lora", "all"], help="what to train")
    p.add_argument("--out", type=Path, default=Path("demo"), help="shipped diffusers folder (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sdrt_train"), help="scratch folder (default: %(default)s)")
    p.add_argument(
        "--bpe-vocab",
        type=Path,
        default=None,
        help="bpe_simple_vocab_16e6.txt.gz; fetched from the open_clip_torch wheel if omitted",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core; the other is left to whatever else runs on the machine
    setup_logging(args.work)
    cfg = models.DemoConfig()
    t0 = time.time()
    if args.stage in ("vae", "all"):
        train_vae(args.work, cfg)
    if args.stage in ("base", "all"):
        bpe = args.bpe_vocab or fetch_bpe(args.work / "bpe_simple_vocab_16e6.txt.gz")
        train_base(args.work, args.out, cfg, bpe)
    if args.stage in ("lora", "all"):
        train_lora(args.out)
    log.info("stage %s finished in %.1f min", args.stage, (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
