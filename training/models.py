"""Architecture of the demo model: real diffusers/transformers classes at toy sizes.

Sizes are chosen for two budgets: the shipped fp32 folder stays under 30 MB, and all training fits in about
an hour on one CPU thread. The 49408-token CLIP embedding dominates the text encoder, so its hidden size is 32;
the UNet sees 8x8x4 latents (64 px pictures, VAE factor 8 as in SD 1.x) and gets the rest of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo model."""

    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 blocks: 3 downsamplings, factor 8
    vae_norm_groups: int = 16  # narrow 64 px blocks keep the VAE cheap on one CPU thread
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 3
    text_heads: int = 2
    text_intermediate: int = 128
    unet_channels: tuple[int, ...] = (64, 96, 96)
    unet_heads: int = 8  # diffusers' `attention_head_dim` (a head count in SD 1.x configs)


def build_vae(cfg: DemoConfig) -> AutoencoderKL:
    """AutoencoderKL with SD's block types; scaling_factor is set after training from the latent std."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
    )


def build_text_encoder(cfg: DemoConfig) -> CLIPTextModel:
    """CLIPTextModel over the full CLIP BPE vocabulary (quick_gelu, causal mask, as in SD 1.x)."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=cfg.text_hidden,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return CLIPTextModel(config)


def build_unet(cfg: DemoConfig) -> UNet2DConditionModel:
    """UNet2DConditionModel in the SD 1.x layout: cross-attention in all but the lowest-resolution block."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 8,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=32,
    )


def build_scheduler() -> PNDMScheduler:
    """The SD 1.x scheduler config (stable-diffusion-v1-5 scheduler/scheduler_config.json)."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )
