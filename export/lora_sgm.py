"""The SGM/LDM module names of a diffusers UNet, for kohya LoRA files trained on sd-scripts' SDXL UNet.

sd-scripts trains SDXL on its own SGM-layout UNet, so its SDXL LoRA keys read
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` where diffusers says
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` (research/lora_taiyi_schedulers.md §1.b).
We map each diffusers module path forward to its SGM path, walking the UNet's own blocks in the order LDM's
`UNetModel` builds them; kohya names are then looked up as they are spelt, never split back on `_`.
The oracle for this map is diffusers' own LDM -> diffusers converter (tests/test_lora_families.py).
"""

from __future__ import annotations

import re

import torch

# Top-level modules outside the block structure (diffusers `convert_ldm_unet_checkpoint` in reverse).
TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# ResnetBlock2D children -> LDM ResBlock children (in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU,
# dropout, conv], emb_layers = [SiLU, linear]).
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# (block path)(rest): the blocks block_paths() numbers, then the path inside the block.
_BLOCK = re.compile(r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions)\.\d+"
                    r"|mid_block\.(?:resnets|attentions)\.\d+"
                    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv)((?:\..+)?)")


def uses_sgm_names(unet: torch.nn.Module) -> bool:
    """SDXL UNets (text_time conditioning): sd-scripts names their modules the SGM way. SD1/SD2 kohya files use
    the diffusers tree, and diffusers remaps SGM names only in its SDXL pipeline, so we do the same."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def block_paths(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers block path -> SGM block path, numbered as LDM's UNetModel appends its blocks."""
    out: dict[str, str] = {}
    i = 0  # input_blocks.0 is conv_in
    for b, block in enumerate(unet.down_blocks):
        has_attn = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            i += 1
            out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if has_attn:
                out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if block.downsamplers:
            i += 1
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
    mid = unet.mid_block
    if mid is not None:
        # middle_block = [ResBlock, (SpatialTransformer, ResBlock)*n]
        attns = getattr(mid, "attentions", None) or ()
        step = 2 if attns else 1
        for k in range(len(mid.resnets)):
            out[f"mid_block.resnets.{k}"] = f"middle_block.{k * step}"
        for k in range(len(attns)):
            out[f"mid_block.attentions.{k}"] = f"middle_block.{2 * k + 1}"
    o = 0
    for b, block in enumerate(unet.up_blocks):
        has_attn = bool(getattr(block, "attentions", None))
        n = len(block.resnets)
        for j in range(n):
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{o}.0"
            if has_attn:
                out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{o}.1"
            if j == n - 1 and block.upsamplers:
                # The Upsample is the last layer of the block's last output block: after the transformer if any.
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{o}.{2 if has_attn else 1}.conv"
            o += 1
    return out


def sgm_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module path -> SGM module path, for every UNet module that has an SGM counterpart."""
    blocks = block_paths(unet)
    names = {}
    for name, _ in unet.named_modules():
        if name in TOP:
            names[name] = TOP[name]
            continue
        m = _BLOCK.fullmatch(name)
        if not m or m.group(1) not in blocks:
            continue
        rest = m.group(2)
        if ".resnets." in m.group(1) and rest:
            head, _, tail = rest[1:].partition(".")
            rest = "." + RESNET.get(head, head) + (f".{tail}" if tail else "")
        names[name] = blocks[m.group(1)] + rest
    return names
