"""Where each diffusers/transformers weight lives in an original (LDM / A1111) single-file checkpoint.

One name map per component, written once, in the diffusers -> LDM direction: `slot(name)` says which tensor of
the file (and which part of it) holds the diffusers parameter `name`. Reading a file (`read_state_dict`) and
writing one (`write_state_dict`, the inverse, used by the tests and the random single-file writer) both go
through these maps, and the tests check them against diffusers' own converter (`from_single_file`).

The layouts are research/lora_taiyi_schedulers.md §2.d (diffusers 0.42.1 `single_file_utils.py`:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

# File prefixes of each part (after unwrapping a top-level "state_dict").
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIXES = ("first_stage_model.", "vae.")
SD1_CLIP_PREFIX = "cond_stage_model.transformer."  # HF CLIPTextModel layout (also Taiyi's BERT, HF layout)
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP layout
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


@dataclass(frozen=True)
class Slot:
    """A diffusers parameter's place in the file: a key, maybe one of `parts` equal row blocks, maybe reshaped."""

    key: str
    part: int | None = None  # OpenCLIP's fused q/k/v projection: q, k, v are thirds of in_proj
    parts: int = 3
    conv1x1: bool = False  # the LDM VAE's attention uses 1x1 convolutions where diffusers has Linear layers
    transpose: bool = False  # OpenCLIP's text_projection is applied as x @ P; diffusers' Linear holds P.T

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.part is not None:  # a copy: a view would keep the whole fused tensor alive for each third
            tensor = tensor.chunk(self.parts, dim=0)[self.part].clone()
        if self.conv1x1:
            tensor = tensor.reshape(tensor.shape[:2]) if tensor.ndim == 4 else tensor
        if self.transpose:
            tensor = tensor.T.contiguous()
        return tensor


SlotMap = Callable[[str], Slot]

RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_UNET = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
ATTENTION_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


class UnmappedName(ValueError):
    """A diffusers parameter the map does not know: the module is not the architecture the map describes."""


def _split(name: str, table: dict[str, str]) -> tuple[str, str] | None:
    """(mapped module path, parameter suffix) when `name` starts with a key of `table`."""
    for diffusers, ldm in table.items():
        if name.startswith(diffusers + "."):
            return ldm, name[len(diffusers):]
    return None


def _resnet(rest: str, table: dict[str, str]) -> str:
    module, _, param = rest.rpartition(".")
    return f"{table.get(module, module)}.{param}"


def unet_slots(layers_per_block: int, up_attention: tuple[bool, ...], prefix: str = UNET_PREFIX) -> SlotMap:
    """The UNet map: diffusers' down/mid/up blocks onto LDM's flat input_blocks/middle_block/output_blocks.

    Each down level has `layers_per_block` blocks plus a downsampler block; each up level one block more and
    its upsampler inside the last block, after the attention if the level has one.
    """
    per_down, per_up = layers_per_block + 1, layers_per_block + 1

    def slot(name: str) -> Slot:
        if top := _split(name, TOP_UNET):
            return Slot(prefix + top[0] + top[1])
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", name)
        if m:
            side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                block = f"input_blocks.{1 + i * per_down + j}"
                if kind == "downsamplers":
                    return Slot(f"{prefix}input_blocks.{(i + 1) * per_down}.0.op.{rest.removeprefix('conv.')}")
            else:
                block = f"output_blocks.{i * per_up + j}"
                if kind == "upsamplers":
                    last = f"output_blocks.{i * per_up + layers_per_block}"
                    return Slot(f"{prefix}{last}.{2 if up_attention[i] else 1}.{rest}")
            if kind == "resnets":
                return Slot(f"{prefix}{block}.0.{_resnet(rest, RESNET_UNET)}")
            return Slot(f"{prefix}{block}.1.{rest}")
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
        if m:
            if m[1] == "attentions":
                return Slot(f"{prefix}middle_block.1.{m[3]}")
            return Slot(f"{prefix}middle_block.{2 * int(m[2])}.{_resnet(m[3], RESNET_UNET)}")
        raise UnmappedName(name)

    return slot


def vae_slots(levels: int, prefix: str = VAE_PREFIXES[0]) -> SlotMap:
    """The VAE map; diffusers numbers the decoder's up blocks in the reverse of LDM's order."""

    def slot(name: str) -> Slot:
        m = re.fullmatch(r"(encoder|decoder)\.(.+)", name)
        if not m:
            return Slot(prefix + name)  # quant_conv, post_quant_conv
        part, rest = m[1], m[2]
        if rest.startswith("conv_norm_out."):
            return Slot(f"{prefix}{part}.norm_out.{rest.removeprefix('conv_norm_out.')}")
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
        if m:
            i = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
            if m[3] == "resnets":
                return Slot(f"{prefix}{part}.{m[1]}.{i}.block.{m[4]}.{m[5].replace('conv_shortcut', 'nin_shortcut')}")
            return Slot(f"{prefix}{part}.{m[1]}.{i}.{m[3][:-2]}.{m[5]}")  # downsamplers.0.conv -> downsample.conv
        m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
        if m:
            return Slot(f"{prefix}{part}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}")
        m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
        if m:
            if m[1] not in ATTENTION_VAE:
                raise UnmappedName(name)
            conv = m[1] != "group_norm" and m[2] == "weight"
            return Slot(f"{prefix}{part}.mid.attn_1.{ATTENTION_VAE[m[1]]}.{m[2]}", conv1x1=conv)
        return Slot(f"{prefix}{part}.{rest}")  # conv_in, conv_out

    return slot


def hf_slots(prefix: str) -> SlotMap:
    """transformers' own layout under a prefix (Taiyi's BERT; diffusers-layout VAE files with prefix "")."""
    return lambda name: Slot(prefix + name)


def clip_slots(prefix: str, nested: bool = True) -> SlotMap:
    """CLIP-L in transformers' layout (SD 1.x, SDXL's first encoder), as saved with a `text_model.` level.

    transformers >= 5.6 builds CLIPTextModel without that level, older versions with it, and the oldest files
    lack it (`nested=False`): the module's own nesting is dropped and the file's put back.
    """
    inner = "text_model." if nested else ""
    return lambda name: Slot(prefix + inner + name.removeprefix("text_model."))


def open_clip_slots(prefix: str) -> SlotMap:
    """OpenCLIP's text tower (SD 2.x, SDXL's bigG) onto transformers' CLIPTextModel(WithProjection)."""

    def slot(name: str) -> Slot:
        if name == "text_projection.weight":
            return Slot(prefix + "text_projection", transpose=True)
        rest = name.removeprefix("text_model.")
        if rest == "embeddings.token_embedding.weight":
            return Slot(prefix + "token_embedding.weight")
        if rest == "embeddings.position_embedding.weight":
            return Slot(prefix + "positional_embedding")
        if rest.startswith("final_layer_norm."):
            return Slot(prefix + "ln_final." + rest.removeprefix("final_layer_norm."))
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m:
            block = f"{prefix}transformer.resblocks.{m[1]}."
            qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
            if m[2] in qkv:
                return Slot(f"{block}attn.in_proj_{m[3]}", part=qkv[m[2]])
            if m[2] in OPEN_CLIP_LAYER:
                return Slot(f"{block}{OPEN_CLIP_LAYER[m[2]]}.{m[3]}")
        raise UnmappedName(name)

    return slot


# The LDM UNet's module and parameter names, for reading EMA keys back: `model_ema.` + the UNet key without its
# "model." and without dots (LitEma's naming), e.g. model_ema.diffusion_modelinput_blocks11proj_inweight.
UNET_WORDS = ("diffusion_model", "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out",
              "in_layers", "emb_layers", "out_layers", "skip_connection", "op", "conv", "norm", "proj_in",
              "proj_out", "transformer_blocks", "attn1", "attn2", "norm1", "norm2", "norm3", "ff", "net", "proj",
              "to_q", "to_k", "to_v", "to_out", "weight", "bias")
# Indices after a word: "b" a block number (any digits; the sub-index that follows is one digit), "i" one digit.
UNET_INDICES = {"input_blocks": "bi", "output_blocks": "bi", "middle_block": "i", "time_embed": "i",
                "label_emb": "ii", "out": "i", "in_layers": "i", "emb_layers": "i", "out_layers": "i",
                "transformer_blocks": "b", "to_out": "i", "net": "i"}


def ema_key(unet_key: str) -> str:
    """The EMA copy's key of an LDM UNet key (`model.diffusion_model.X`)."""
    return EMA_PREFIX + unet_key.removeprefix("model.").replace(".", "")


def unet_key_of_ema(key: str) -> str | None:
    """The inverse of `ema_key`, parsed with the UNet's vocabulary; None if `key` is not a UNet EMA key."""
    flat, parts = key.removeprefix(EMA_PREFIX), []
    words = sorted(UNET_WORDS, key=len, reverse=True)
    while flat:
        word = next((w for w in words if flat.startswith(w)), None)
        if word is None:
            return None
        parts.append(word)
        flat = flat[len(word):]
        digits = re.match(r"\d*", flat)[0]
        spec = UNET_INDICES.get(word, "")
        if spec == "bi" and len(digits) >= 2:
            parts += [digits[:-1], digits[-1]]
        elif spec == "b" and digits:
            parts.append(digits)
        elif spec in ("i", "ii") and len(digits) >= len(spec):
            parts += list(digits[:len(spec)])
            digits = digits[:len(spec)]
        elif spec or digits:
            return None
        flat = flat[len(digits):]
    if parts[:1] != ["diffusion_model"] or parts[-1] not in ("weight", "bias"):
        return None
    return "model." + ".".join(parts)


def read_state_dict(names: Iterable[str], slots: SlotMap, get: Callable[[str], torch.Tensor]) -> dict:
    """The diffusers state dict for parameter `names`, read through the map from the file's tensors (`get`)."""
    return {name: s.read(get(s.key)) for name in names for s in (slots(name),)}


def write_state_dict(state: dict[str, torch.Tensor], slots: SlotMap) -> dict[str, torch.Tensor]:
    """The inverse: the file's tensors for a diffusers state dict (parts concatenated, 1x1 convs restored)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        s = slots(name)
        if s.transpose:
            tensor = tensor.T
        if s.conv1x1:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        if s.part is None:
            out[s.key] = tensor.contiguous()
        else:
            fused.setdefault(s.key, {})[s.part] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous()
    return out
