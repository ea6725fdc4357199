"""diffusers/transformers configs read from a single file's weight shapes, offline.

Every size the shapes determine comes from them: channels, levels, layers per block, transformer depth,
context width, text-encoder width/depth/vocabulary, VAE levels and latent channels. What the shapes cannot say
comes from the family's fixed constants (`Constants`), as stable-diffusion.cpp does it: SD 1.x's 8 attention
heads, 64-wide heads for SD 2.x/SDXL, CLIP-L's 12 heads, GroupNorm's 32 groups. So the same code configures
full-size and tiny files. `shapes` maps a file key (prefix included) to its shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdrt.runtime.errors import UserError

Shapes = dict[str, tuple[int, ...]]

NORM_GROUPS = 32  # every SD UNet and VAE
HEAD_WIDTH = 64  # SD 2.x/SDXL UNet heads, OpenCLIP heads
CLIP_L_HEADS = 12
BERT_HEADS = 12  # Taiyi's BERT-base
CLIP_BOS, CLIP_EOS = 49406, 49407  # CLIP BPE special tokens (transformers' CLIPTextConfig defaults)


@dataclass(frozen=True)
class Constants:
    """What a family's weights do not say."""

    unet_heads: int | None  # a fixed head count (SD 1.x: 8), or None: HEAD_WIDTH-wide heads
    upcast_attention: bool = False  # SD 2.1 computes attention scores in fp32 (no-op in an fp32 export)


def indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := rx.match(k))})


def count(shapes: Shapes, pattern: str) -> int:
    found = indices(shapes, pattern)
    return found[-1] + 1 if found else 0


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UserError(f"not a complete {what}: no tensor {key}")
    return shapes[key]


def unet_config(shapes: Shapes, prefix: str, constants: Constants, sample_size: int,
                pooled_dim: int | None) -> dict:
    """UNet2DConditionModel config of an LDM UNet (`create_unet_diffusers_config_from_ldm`, from shapes)."""
    what = "Stable Diffusion UNet"
    conv_in = _need(shapes, f"{prefix}input_blocks.0.0.weight", what)
    p = re.escape(prefix)
    n_input = count(shapes, rf"{p}input_blocks\.(\d+)\.")
    downsamplers = indices(shapes, rf"{p}input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downsamplers) + 1
    per_level, rest = divmod(n_input, levels)
    if rest or per_level < 2 or downsamplers != [per_level * (i + 1) for i in range(levels - 1)]:
        raise UserError(f"unrecognised UNet layout: {n_input} input blocks, downsamplers at {downsamplers}")
    layers = per_level - 1
    channels, attention, depth = [], [], []
    for i in range(levels):
        block = f"{prefix}input_blocks.{1 + i * per_level}"
        channels.append(_need(shapes, f"{block}.0.out_layers.3.weight", what)[0])
        attention.append(any(k.startswith(f"{block}.1.") for k in shapes))
        depth.append(count(shapes, rf"{re.escape(block)}\.1\.transformer_blocks\.(\d+)\.") or 1)
    if not any(attention):
        raise UserError("unrecognised UNet layout: no cross-attention blocks")
    first = f"{prefix}input_blocks.{1 + attention.index(True) * per_level}.1"
    mid_depth = count(shapes, rf"{p}middle_block\.1\.transformer_blocks\.(\d+)\.")
    if mid_depth != depth[-1]:  # diffusers builds the middle block with the last level's depth
        raise UserError(f"unsupported UNet layout: middle block depth {mid_depth}, last level {depth[-1]}")
    heads = constants.unet_heads or [max(1, c // HEAD_WIDTH) for c in channels]
    time_embed = _need(shapes, f"{prefix}time_embed.0.weight", what)
    config = dict(
        sample_size=sample_size,
        in_channels=conv_in[1],
        out_channels=_need(shapes, f"{prefix}out.2.weight", what)[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=_need(shapes, f"{first}.transformer_blocks.0.attn2.to_k.weight", what)[1],
        attention_head_dim=heads,
        transformer_layers_per_block=depth,
        use_linear_projection=len(_need(shapes, f"{first}.proj_in.weight", what)) == 2,
        upcast_attention=constants.upcast_attention,
        norm_num_groups=NORM_GROUPS,
    )
    if time_embed[0] != 4 * channels[0]:
        config["time_embedding_dim"] = time_embed[0]
    label = shapes.get(f"{prefix}label_emb.0.0.weight")
    if label is not None:  # SDXL: the pooled text embedding and 6 Fourier-embedded size/crop ids
        if pooled_dim is None or (label[1] - pooled_dim) % 6:
            raise UserError(f"unsupported UNet: added conditioning of {label[1]} values")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(label[1] - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=label[1])
    return config


def vae_config(shapes: Shapes, prefix: str, sample_size: int, scaling_factor: float, diffusers_layout=False) -> dict:
    """AutoencoderKL config of a VAE in the LDM layout (`encoder.down.i.block.j`) or diffusers' own."""
    what = "VAE"
    p = re.escape(prefix)
    if diffusers_layout:
        levels = count(shapes, rf"{p}encoder\.down_blocks\.(\d+)\.")
        block = lambda i, j: f"{prefix}encoder.down_blocks.{i}.resnets.{j}"  # noqa: E731
        layers = count(shapes, rf"{p}encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        attention = f"{prefix}encoder.mid_block.attentions.0.to_q.weight"
    else:
        levels = count(shapes, rf"{p}encoder\.down\.(\d+)\.")
        block = lambda i, j: f"{prefix}encoder.down.{i}.block.{j}"  # noqa: E731
        layers = count(shapes, rf"{p}encoder\.down\.0\.block\.(\d+)\.")
        attention = f"{prefix}encoder.mid.attn_1.q.weight"
    if levels == 0:
        raise UserError(f"not a complete {what}: no encoder down blocks under '{prefix}'")
    return dict(
        in_channels=_need(shapes, f"{prefix}encoder.conv_in.weight", what)[1],
        out_channels=_need(shapes, f"{prefix}decoder.conv_out.weight", what)[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[_need(shapes, f"{block(i, 0)}.conv1.weight", what)[0] for i in range(levels)],
        layers_per_block=layers,
        latent_channels=_need(shapes, f"{prefix}decoder.conv_in.weight", what)[1],
        norm_num_groups=NORM_GROUPS,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        use_quant_conv=f"{prefix}quant_conv.weight" in shapes,
        use_post_quant_conv=f"{prefix}post_quant_conv.weight" in shapes,
        mid_block_add_attention=attention in shapes,
    )


def clip_config(shapes: Shapes, prefix: str) -> dict:
    """CLIPTextConfig of CLIP-L in transformers' layout (SD 1.x, SDXL's first encoder): quick_gelu, 12 heads."""
    what = "CLIP text encoder"
    vocab, hidden = _need(shapes, f"{prefix}embeddings.token_embedding.weight", what)
    return dict(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=_need(shapes, f"{prefix}embeddings.position_embedding.weight", what)[0],
        num_hidden_layers=count(shapes, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."),
        intermediate_size=_need(shapes, f"{prefix}encoder.layers.0.mlp.fc1.weight", what)[0],
        num_attention_heads=CLIP_L_HEADS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, projection_dim=hidden,
    )


def open_clip_config(shapes: Shapes, prefix: str, drop_last_layer: bool) -> dict:
    """CLIPTextConfig of an OpenCLIP text tower: gelu, 64-wide heads.

    SD 2.x conditions on the penultimate block's output through the final layer norm, which diffusers
    stores as a CLIPTextModel without the last block (`drop_last_layer`).
    """
    what = "OpenCLIP text encoder"
    vocab, hidden = _need(shapes, f"{prefix}token_embedding.weight", what)
    layers = count(shapes, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    projection = shapes.get(f"{prefix}text_projection")
    return dict(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=_need(shapes, f"{prefix}positional_embedding", what)[0],
        num_hidden_layers=layers - 1 if drop_last_layer else layers,
        intermediate_size=_need(shapes, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", what)[0],
        num_attention_heads=max(1, hidden // HEAD_WIDTH), hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS,
        projection_dim=projection[1] if projection else hidden,
    )


def bert_config(shapes: Shapes, prefix: str) -> dict:
    """BertConfig of Taiyi's Chinese BERT (BERT-base constants: 12 heads, gelu, eps 1e-12)."""
    what = "BERT text encoder"
    vocab, hidden = _need(shapes, f"{prefix}embeddings.word_embeddings.weight", what)
    return dict(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=_need(shapes, f"{prefix}embeddings.position_embeddings.weight", what)[0],
        type_vocab_size=_need(shapes, f"{prefix}embeddings.token_type_embeddings.weight", what)[0],
        num_hidden_layers=count(shapes, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\."),
        intermediate_size=_need(shapes, f"{prefix}encoder.layer.0.intermediate.dense.weight", what)[0],
        num_attention_heads=BERT_HEADS, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
    )
