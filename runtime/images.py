"""Image conversions at the pipeline's edges, as diffusers' VaeImageProcessor does them, and PNG output."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import UserError


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read init image {path}: {e}") from None


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H, W, 3] / [N, H, W, 3] array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    a = np.asarray(image)
    return a.shape[-3], a.shape[-2]


def preprocess(image, height: int, width: int) -> np.ndarray:
    """PIL image or float array in [0, 1] ([H, W, 3] or [N, H, W, 3]) -> float32 NCHW in [-1, 1].

    Resizing (when the size differs) uses Lanczos, as diffusers' VaeImageProcessor does for PIL input.
    """
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.LANCZOS)
        a = np.asarray(im, dtype=np.float32)[None] / 255.0
    else:
        a = np.asarray(image, dtype=np.float32)
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[-1] != 3:
            raise UserError(f"image array must be [H, W, 3] or [N, H, W, 3] in [0, 1], got shape {list(a.shape)}")
        if a.shape[1:3] != (height, width):
            raise UserError(f"image array is {a.shape[2]}x{a.shape[1]}, expected {width}x{height}")
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2) * 2.0 - 1.0, dtype=np.float32)


def postprocess(decoded: np.ndarray) -> np.ndarray:
    """VAE output NCHW in about [-1, 1] -> float32 NHWC in [0, 1]."""
    return np.clip(decoded.transpose(0, 2, 3, 1) * 0.5 + 0.5, 0.0, 1.0).astype(np.float32)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """NHWC [0, 1] -> PIL images, rounded as diffusers' numpy_to_pil does."""
    return [Image.fromarray(x) for x in (images * 255).round().astype(np.uint8)]


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Write a PNG with the generation parameters in a text chunk named `parameters` (A1111 format)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """A PNG file's bytes with `parameters` in its text chunk, as save_png writes it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
