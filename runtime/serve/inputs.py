"""From a front door's fields to the queue's ImageSpecs, with every value checked and every error naming the
field as that front door spells it. Shared by the A1111 and native APIs; no HTTP here.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import warnings
from dataclasses import dataclass, field
from io import BytesIO

from PIL import Image, ImageOps

from ..errors import UserError
from ..infotext import Infotext, from_sdrt, to_sdrt
from ..manifest import UNET, VAE_ENCODER
from ..pipeline import Pipeline
from ..schedulers import SCHEDULER_NAMES
from .config import Limits
from .jobs import ImageSpec

MAX_SEED = 2**32 - 1  # A1111's seed range; `all_seeds` go up from the seed, so seed + n - 1 may pass it
MAX_PROMPT_CHARS = 20_000  # far past any tokenizer's 77 tokens; a bound on what a request can make us hold


class FieldError(Exception):
    """A request value that cannot be used: answered with a 4xx naming `field`."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Settings:
    """One request's generation settings in sdrt's terms; None takes the engine dir's default."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None  # sdrt name
    seed: int | None = None  # None or -1: a random one, reported back
    width: int | None = None
    height: int | None = None
    n: int = 1
    init_images: tuple = ()  # PIL images; image i uses init_images[i % len]
    strength: float = 0.8
    guidance_rescale: float | None = None
    # The front door's name for each setting, for error messages (A1111: cfg_scale, batch_size, ...).
    names: dict[str, str] = field(default_factory=dict)

    def name(self, setting: str) -> str:
        return self.names.get(setting, setting)


def decode_image(field_name: str, value: str, limits: Limits) -> Image.Image:
    """Raw base64 or a `data:image/...;base64,` URI -> an RGB PIL image. URLs are not fetched."""
    if not isinstance(value, str) or not value:
        raise FieldError(field_name, "expected a base64-encoded image")
    if value.startswith(("http://", "https://")):
        raise FieldError(field_name, "image URLs are not fetched; send the image as base64")
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise FieldError(field_name, "a data URI must be data:image/<type>;base64,<data>")
    try:
        raw = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError(field_name, f"invalid base64: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(raw))
            if im.width * im.height > limits.max_image_pixels:
                raise FieldError(field_name, f"image is {im.width}x{im.height}, larger than the "
                                 f"{limits.max_image_pixels} pixels this server accepts")
            try:
                im = ImageOps.exif_transpose(im)  # a phone photo the way up it was taken
            except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still good
                pass
            return im.convert("RGB")
    except FieldError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many kinds on malformed files
        raise FieldError(field_name, f"not a readable image: {e}") from None


def model_name(pipe: Pipeline) -> str:
    """The served model's name in every front door: the engine dir's folder name."""
    return pipe.engine_dir.resolve().name


def scheduler_name(field_name: str, name: str | None) -> str | None:
    """An sdrt scheduler name from an sdrt or A1111 name (None: the engine's default)."""
    if name is None or name in SCHEDULER_NAMES:
        return name
    try:
        return to_sdrt(name)
    except UserError:
        raise FieldError(field_name, f"unknown {field_name} '{name}' (sdrt names: {', '.join(SCHEDULER_NAMES)}; "
                         "A1111 sampler names are accepted too)") from None


def _check_text(s: Settings, key: str) -> None:
    text = getattr(s, key)
    if text is None:
        return
    if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
        raise FieldError(s.name(key), f"must be a string of at most {MAX_PROMPT_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but no text the tokenizer takes
        raise FieldError(s.name(key), "is not valid Unicode text") from None


def _check(s: Settings, limits: Limits) -> None:
    _check_text(s, "prompt")
    _check_text(s, "negative_prompt")
    if not 1 <= s.n <= limits.max_images:
        raise FieldError(s.name("n"), f"{s.n} images asked; this server makes 1 to {limits.max_images} per request")
    if s.steps is not None and not 1 <= s.steps <= limits.max_steps:
        raise FieldError(s.name("steps"), f"must be 1 to {limits.max_steps}, got {s.steps}")
    if s.guidance_scale is not None and not 0.0 <= s.guidance_scale <= 100.0:  # NaN fails too
        raise FieldError(s.name("guidance_scale"), f"must be 0 to 100, got {s.guidance_scale}")
    if s.guidance_rescale is not None and not 0.0 <= s.guidance_rescale <= 1.0:
        raise FieldError(s.name("guidance_rescale"), f"must be 0 to 1, got {s.guidance_rescale}")
    if s.init_images and not 0.0 < s.strength <= 1.0:
        raise FieldError(s.name("strength"), f"must be in (0, 1], got {s.strength}")
    if s.seed is not None and s.seed != -1 and not 0 <= s.seed <= MAX_SEED:
        raise FieldError(s.name("seed"), f"must be -1 (random) or 0 to {MAX_SEED}, got {s.seed}")
    for key in ("width", "height"):
        v = getattr(s, key)
        if v is not None and v < 1:
            raise FieldError(s.name(key), f"must be a positive number of pixels, got {v}")


# Pipeline.request's messages start with the setting they are about.
_MESSAGE_FIELDS = (("height", "height"), ("width", "width"), ("steps", "steps"), ("strength", "strength"),
                   ("guidance_scale", "guidance_scale"), ("guidance_rescale", "guidance_rescale"),
                   ("unknown scheduler", "scheduler"), ("the checkpoint's scheduler", "scheduler"))


def image_specs(pipe: Pipeline, s: Settings, limits: Limits) -> tuple[list[ImageSpec], list[int]]:
    """Checked ImageSpecs, one per image, seeded seed, seed + 1, ...; and those seeds."""
    _check(s, limits)
    seed = secrets.randbelow(MAX_SEED + 1) if s.seed is None or s.seed == -1 else s.seed
    model = model_name(pipe)
    specs = []
    for i in range(s.n):
        image = s.init_images[i % len(s.init_images)] if s.init_images else None
        try:
            req = pipe.request(s.prompt, s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale,
                               scheduler=s.scheduler, height=s.height, width=s.width, strength=s.strength,
                               image=image, guidance_rescale=s.guidance_rescale)
        except UserError as e:
            text = str(e)
            setting = next((f for prefix, f in _MESSAGE_FIELDS if text.startswith(prefix)), "body")
            raise FieldError(s.name(setting), text) from None
        info = Infotext(s.prompt, s.negative_prompt or "", req.steps, req.scheduler, req.guidance_scale, seed + i,
                        req.width, req.height, model, req.strength if image is not None else None,
                        req.guidance_rescale)
        specs.append(ImageSpec(req, seed + i, image, info.text()))
    return specs, [seed + i for i in range(s.n)]


def engine_info(pipe: Pipeline, limits: Limits) -> dict:
    """What a client may ask of this engine: sizes, defaults, samplers, image-to-image, the server's limits."""
    m = pipe.manifest
    f = m.vae_scale_factor
    axes = m.components[UNET].axes
    h, w = axes["latent_height"], axes["latent_width"]
    samplers = []
    for name in SCHEDULER_NAMES:
        sampler, schedule = from_sdrt(name)
        samplers.append({"name": name, "a1111": sampler.name + ("" if schedule == "Uniform" else f" {schedule}")})
    d = pipe.defaults
    return {
        "model": model_name(pipe), "family": m.family, "backend": pipe.backend.name,
        "native": {"width": m.native_resolution[1], "height": m.native_resolution[0]},
        "width": {"min": w.min * f, "max": w.max * f, "step": w.multiple_of * f},
        "height": {"min": h.min * f, "max": h.max * f, "step": h.multiple_of * f},
        "defaults": {"steps": d.steps, "guidance_scale": d.guidance_scale, "scheduler": d.scheduler,
                     "guidance_rescale": d.guidance_rescale},
        "samplers": samplers, "img2img": VAE_ENCODER in m.components,
        "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps,
                   "max_image_pixels": limits.max_image_pixels},
    }
