"""Tiled VAE decode and encode: diffusers' AutoencoderKL `enable_tiling()` in numpy, around any engine call.

`tiled_decode` matches AutoencoderKL.tiled_decode and `tiled_encode` matches AutoencoderKL._tiled_encode
(diffusers 0.42.1, models/autoencoders/autoencoder_kl.py): tiles of `tile` cells start every int(0.75 * tile)
cells, the last ones along an axis as small as what remains; each tile's output is blended linearly into the
tile above it and the tile to its left over int(0.25 * output tile) rows and columns (blend_v, blend_h), then
cropped to the output tile less that extent. diffusers' blends write into the tile, so a tile blends with
neighbours that are already blended themselves; `_blend` keeps that order.

Like diffusers, these functions always tile; the caller decides when (`needs_tiling`): AutoencoderKL.decode and
.encode tile only an input larger than one tile. The encoder's (mean, logvar) are blended one by one, which is
diffusers' blend of the moments (the channel-wise concatenation of both): the blend acts on each channel alone.
Our vae_encoder already clamps logvar to [-30, 20] inside each tile, where diffusers clamps after blending; the
two differ only for a tile whose logvar leaves that range.

The one difference from diffusers, only where the engine would refuse a tile (`axes`: the engine input's
height and width axes): an engine accepts sizes from its manifest axes (min..max, multiple_of), and diffusers'
last tiles can be smaller than the minimum (SD 1.5, 72 latent rows: tiles of 64 and 24 rows, the engine takes
32..128). Such a tile runs on the smallest accepted window that holds it, grown into the image (a last tile
reaches back over its neighbour: real pixels, nothing invented), and its output is cropped back to the tile.
Tile positions, blend extents and crops stay diffusers'; only that tile's output differs, because the model saw
more context. Where the side, the stride and the tile are multiples of `multiple_of` and the tile is in range,
every tile is accepted, and the output is diffusers' (to float rounding), when the last tile along each axis,
side - stride * floor((side - 1) / stride), is at least the axis minimum. SD 1.5 (tile 64 latent cells, stride
48, minimum 32) is exact at 640, 704, 768 and 1024 px and falls back at 576, 832, 896 and 960 px.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# diffusers' tile_overlap_factor: a quarter of a tile overlaps its neighbour.
TILE_OVERLAP = 0.25


def tile_sizes(manifest) -> tuple[int, int]:
    """(latent cells, pixels) per tile side: diffusers' tile_latent_min_size and tile_sample_min_size."""
    # Engine dirs exported before `vae.sample_size` was recorded: the native resolution, which equals the VAE's
    # sample_size in SD 1.x (512), SD 2 768-v (768) and SDXL (1024), and in every single-file export (sdrt
    # writes the VAE config with the native size).
    sample = manifest.vae.sample_size or max(manifest.native_resolution)
    # int(sample_size / 2 ** (len(block_out_channels) - 1)); vae_scale_factor is that power of two.
    return sample // manifest.vae_scale_factor, sample


def needs_tiling(height: int, width: int, tile: int) -> bool:
    """diffusers tiles only an input larger than one tile on either side (AutoencoderKL._decode / _encode)."""
    return height > tile or width > tile


def tiled_decode(z: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], tile_latent: int, tile_sample: int,
                 axes: Sequence | None = None) -> np.ndarray:
    """AutoencoderKL.tiled_decode: `decode(latent tile [B, C, h, w]) -> image tile [B, 3, h*f, w*f]` per tile;
    `axes`: the (height, width) Axis of decode's input, to fit refused tiles (module docstring), or None."""
    rows = _run_tiles(z, lambda t: (decode(t),), tile_latent, axes)
    extent = int(tile_sample * TILE_OVERLAP)
    return _blend([[t[0] for t in row] for row in rows], extent, tile_sample - extent)


def tiled_encode(x: np.ndarray, encode: Callable[[np.ndarray], Sequence[np.ndarray]], tile_sample: int,
                 tile_latent: int, axes: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AutoencoderKL._tiled_encode: `encode(image tile) -> (mean, logvar)` per tile (quant_conv included);
    returns the blended (mean, logvar). `axes` as for tiled_decode, in pixels."""
    rows = _run_tiles(x, encode, tile_sample, axes)
    extent = int(tile_latent * TILE_OVERLAP)
    mean, logvar = (_blend([[t[k] for t in row] for row in rows], extent, tile_latent - extent) for k in (0, 1))
    return mean, logvar


def accepted_size(axis, size: int, limit: int) -> int | None:
    """The smallest value from `size` to `limit` that `axis` (a manifest Axis) accepts, None if there is none."""
    step = axis.multiple_of
    n = -(-max(size, axis.min) // step) * step
    while n <= min(limit, axis.max):
        if axis.check(n):
            return n
        n += step
    return None


def _window(start: int, size: int, total: int, axis) -> tuple[int, int]:
    """(begin, length) the engine runs for the tile [start, start + size) of an axis of length `total`."""
    if axis is None or axis.check(size):
        return start, size
    n = accepted_size(axis, size, total)
    if n is None:
        raise ValueError(f"a {size}-long VAE tile fits no size from {size} to {total} that the engine accepts "
                         f"({axis.describe()})")
    return min(start, total - n), n


def _crop(out: np.ndarray, offset: int, size: int, window: int, dim: int) -> np.ndarray:
    """The part of `out` (computed on a window) that belongs to the tile at `offset` in it, along `dim`."""
    if (offset, size) == (0, window):
        return out
    n = out.shape[dim]
    if (offset * n) % window or (size * n) % window:
        raise ValueError(f"a VAE tile at {offset}:{offset + size} of a {window}-long window does not map to whole "
                         f"output cells ({n})")
    index = [slice(None)] * out.ndim
    index[dim] = slice(offset * n // window, (offset + size) * n // window)
    return out[tuple(index)]


def _run_tiles(x: np.ndarray, run: Callable, tile: int, axes: Sequence | None) -> list[list[tuple]]:
    """`run`'s outputs on diffusers' tiles of x (rows of tiles), each a writable float32 copy.

    Copies, because the blend writes into them and a backend may hand out buffers it reuses on the next call.
    """
    h, w = x.shape[-2:]
    stride = int(tile * (1 - TILE_OVERLAP))
    ax_h, ax_w = axes if axes is not None else (None, None)
    rows = []
    for i in range(0, h, stride):
        row = []
        for j in range(0, w, stride):
            th, tw = min(tile, h - i), min(tile, w - j)
            (bi, nh), (bj, nw) = _window(i, th, h, ax_h), _window(j, tw, w, ax_w)
            outs = run(x[..., bi:bi + nh, bj:bj + nw])
            row.append(tuple(np.array(_crop(_crop(o, i - bi, th, nh, -2), j - bj, tw, nw, -1), np.float32)
                             for o in outs))
        rows.append(row)
    return rows


def _blend(rows: list[list[np.ndarray]], extent: int, limit: int) -> np.ndarray:
    """Blend each tile into the ones above and left of it (in place, in diffusers' order), crop, join."""
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend_axis(rows[i - 1][j], tile, extent, -2)
            if j > 0:
                _blend_axis(row[j - 1], tile, extent, -1)
    return np.concatenate([np.concatenate([t[..., :limit, :limit] for t in row], axis=-1) for row in rows], axis=-2)


def _blend_axis(a: np.ndarray, b: np.ndarray, extent: int, dim: int) -> None:
    """diffusers' blend_v (dim -2) / blend_h (dim -1): b's first e rows go linearly from a's last e rows to b's,
    weights 1 - y/e and y/e (y = 0..e-1), e = min(extent, both lengths); b is written in place."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return
    y = np.arange(e, dtype=np.float64) / e
    shape = (e, 1) if dim == -2 else (e,)
    # float32 weights: torch multiplies a float32 tensor by a Python float in float32.
    keep, take = (1 - y).astype(np.float32).reshape(shape), y.astype(np.float32).reshape(shape)
    if dim == -2:
        b[..., :e, :] = a[..., -e:, :] * keep + b[..., :e, :] * take
    else:
        b[..., :e] = a[..., -e:] * keep + b[..., :e] * take
