"""Random-weight SD 1.x checkpoints with the real diffusers/transformers architectures.

No weights can be downloaded here, so tests build `tiny` models in seconds and benchmarks build `sd15`, the
full-size SD 1.5 architecture, to measure memory and speed. Both are written as ordinary diffusers folders
(safetensors), exactly what `sdrt export --checkpoint` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Special tokens of the CLIP BPE vocabulary (openai/clip-vit-large-patch14).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class RandomModelConfig:
    """Architecture sizes of one random SD 1.x checkpoint."""

    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_head_dim: int
    unet_sample_size: int  # latent side at the native resolution
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab: int  # 0: the size of the generated tokenizer vocabulary
    norm_groups: int = 32


CONFIGS = {
    # Real block types and cross-attention; 64 px native, 8x8 latents, VAE factor 8 like SD 1.x.
    "tiny": RandomModelConfig(
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        unet_head_dim=8,
        unet_sample_size=8,
        vae_channels=(32, 32, 32, 32),
        vae_layers_per_block=1,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=37,
        text_vocab=0,
    ),
    # stable-diffusion-v1-5 configs (unet/vae/text_encoder config.json).
    "sd15": RandomModelConfig(
        unet_channels=(320, 640, 1280, 1280),
        unet_layers_per_block=2,
        unet_head_dim=8,
        unet_sample_size=64,
        vae_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        text_hidden=768,
        text_layers=12,
        text_heads=12,
        text_intermediate=3072,
        text_vocab=49408,
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (the base alphabet of CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = ("a", "red", "circle", "photo", "of", "cat")) -> int:
    """Write a small CLIP BPE tokenizer (vocab.json + merges.txt layout); returns the vocabulary size.

    The vocabulary is built the way CLIP builds its own: the 256 byte symbols, the same with `</w>`, the merges,
    then the two special tokens. A handful of merges spell `words` so that common prompts are short.
    """
    from transformers import CLIPTokenizer

    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = f"{symbols[0]} {symbols[1]}"
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(vocab)


def sd1_scheduler_config() -> dict:
    """The PNDM scheduler config that ships with stable-diffusion-v1-5."""
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_components(name: str, seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """Instantiate the diffusers/transformers modules of random model `name` with seeded weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    vocab = cfg.text_vocab
    if tokenizer_dir is not None:
        vocab = max(vocab, write_clip_tokenizer(tokenizer_dir))
    n_unet = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.unet_sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_head_dim,
        norm_num_groups=cfg.norm_groups,
    )
    n_vae = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.unet_sample_size * 2 ** (n_vae - 1),
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=cfg.text_hidden,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                scheduler=PNDMScheduler(**sd1_scheduler_config()))


def write_random_checkpoint(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers-format SD 1.x folder with random weights; returns `folder`."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    tokenizer_dir = folder / "tokenizer"
    parts = build_components(name, seed, tokenizer_dir)
    pipe = StableDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m sdrt.export.random_model",
        description="Write a random-weight SD 1.x diffusers checkpoint (real architecture, no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", type=Path, help="folder to create")
    p.add_argument("--model", choices=sorted(CONFIGS), default="tiny", help="architecture size")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} already exists")
    write_random_checkpoint(args.out, args.model, args.seed)
    print(f"wrote {args.model} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
