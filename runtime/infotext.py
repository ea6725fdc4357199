"""AUTOMATIC1111's names and its `parameters` text: the one table between sdrt's scheduler names and A1111's
sampler + schedule type, used by `sdrt generate`'s PNGs and by the server's A1111 API.

A1111 1.9+ keeps the sampler and the noise schedule apart ("DPM++ 2M" + "Karras"); older clients send both in
one name ("DPM++ 2M Karras"). Its `get_sampler_and_scheduler` strips a trailing schedule label or name from the
sampler name, and "Automatic" means the sampler's own default schedule (Karras for DPM++ 2M). Unlike A1111, an
unknown name is an error that lists the supported ones, never a silent fallback to another sampler.

The text format (A1111's `create_infotext`, read back by A1111's "PNG Info" and by sd-parsers): the prompt, a
`Negative prompt:` line when there is one, then `Key: value` pairs joined by ", ". sd-parsers splits that last
line on "," and ":", so a value that contains either is quoted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # A1111's sampler name
    aliases: tuple[str, ...]
    # A1111 schedule label -> sdrt scheduler; the first is what "Automatic" means for this sampler.
    schedules: tuple[tuple[str, str], ...]


AUTOMATIC = "Automatic"

SAMPLERS: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), (("Karras", "dpmpp-2m-karras"), ("Uniform", "dpmpp-2m"))),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), (("Uniform", "euler-a"),)),
    A1111Sampler("Euler", ("k_euler",), (("Uniform", "euler"),)),
    A1111Sampler("LMS", ("k_lms",), (("Uniform", "lms"),)),
    A1111Sampler("DDIM", ("ddim",), (("Uniform", "ddim"),)),
    A1111Sampler("PLMS", ("plms",), (("Uniform", "pndm"),)),
    A1111Sampler("UniPC", ("unipc",), (("Uniform", "unipc"),)),
    A1111Sampler("LCM", ("k_lcm", "lcm"), (("Uniform", "lcm"),)),
)

# A1111's schedule names (`sd_schedulers.py`) for the labels above.
SCHEDULE_NAMES = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras"}


def supported_names() -> list[str]:
    """Every sampler name and legacy combined name the server accepts, for error messages."""
    names = []
    for s in SAMPLERS:
        names.append(s.name)
        if len(s.schedules) > 1:
            names += [f"{s.name} {label}" for label, _ in s.schedules]
    return names


def _find_sampler(name: str) -> A1111Sampler | None:
    key = name.strip().lower()
    for s in SAMPLERS:
        if key == s.name.lower() or key in s.aliases:
            return s
    return None


def _schedule_label(schedule: str | None) -> str:
    """A schedule name or label, any case, -> its label; '' and None are Automatic."""
    if not schedule:
        return AUTOMATIC
    key = schedule.strip().lower()
    for label, name in SCHEDULE_NAMES.items():
        if key in (label.lower(), name):
            return label
    raise UserError(f"unknown schedule type '{schedule}' (supported: {', '.join(SCHEDULE_NAMES)})")


def to_sdrt(sampler: str, schedule: str | None = None) -> str:
    """A1111 sampler name (or alias, or legacy "<sampler> <schedule>") and schedule type -> sdrt scheduler name."""
    found = _find_sampler(sampler)
    label = _schedule_label(schedule)
    if found is None:  # legacy combined name: strip a trailing schedule label or name
        base, _, tail = sampler.strip().rpartition(" ")
        found = _find_sampler(base) if base else None
        if found is None:
            raise UserError(f"unknown sampler '{sampler}' (supported: {', '.join(supported_names())})")
        try:
            tail_label = _schedule_label(tail)
        except UserError:
            raise UserError(f"unknown sampler '{sampler}' (supported: {', '.join(supported_names())})") from None
        if label == AUTOMATIC:
            label = tail_label
    if label == AUTOMATIC:
        return found.schedules[0][1]
    for lab, sdrt_name in found.schedules:
        if lab == label:
            return sdrt_name
    raise UserError(f"sampler '{found.name}' with schedule type '{label}' is not supported "
                    f"(supported: {', '.join(supported_names())})")


def from_sdrt(scheduler: str) -> tuple[A1111Sampler, str]:
    """sdrt scheduler name -> (A1111 sampler, its schedule label, never "Automatic")."""
    for s in SAMPLERS:
        for label, sdrt_name in s.schedules:
            if sdrt_name == scheduler:
                return s, label
    raise ValueError(f"no A1111 name for scheduler {scheduler!r}")


def _value(v) -> str:
    """A value as create_infotext writes it: quoted (JSON) when it holds a separator sd-parsers splits on."""
    text = str(v)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\"") else text


@dataclass(frozen=True)
class Infotext:
    """The generation settings of one image, as A1111 writes them."""

    prompt: str
    negative_prompt: str
    steps: int
    scheduler: str  # sdrt name
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    denoising_strength: float | None = None
    guidance_rescale: float = 0.0

    def pairs(self) -> list[tuple[str, object]]:
        sampler, schedule = from_sdrt(self.scheduler)
        pairs = [("Steps", self.steps), ("Sampler", sampler.name)]
        if len(sampler.schedules) > 1:  # said outright: "DPM++ 2M" alone meant Uniform before A1111 1.9
            pairs.append(("Schedule type", schedule))
        pairs += [("CFG scale", self.cfg_scale), ("Seed", self.seed), ("Size", f"{self.width}x{self.height}"),
                  ("Model", self.model)]
        if self.denoising_strength is not None:
            pairs.append(("Denoising strength", self.denoising_strength))
        if self.guidance_rescale:
            pairs.append(("Guidance rescale", self.guidance_rescale))
        return pairs

    def text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_value(v)}" for k, v in self.pairs()))
        return "\n".join(lines)


def parse(text: str) -> dict[str, str]:
    """A1111 `parameters` text -> {"Prompt", "Negative prompt", and each key: value}, as A1111's PNG Info reads it.

    The last line that holds at least three `Key: value` pairs is the settings line; quoted values are unquoted.
    """
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if lines and len(_pairs(lines[-1])) >= 3:
        settings = _pairs(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}


def _pairs(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(line):
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        j = colon + 1
        while j < len(line) and line[j] == " ":
            j += 1
        if j < len(line) and line[j] == '"':
            try:
                value, end = json.JSONDecoder().raw_decode(line, j)
            except ValueError:
                return {}
            j = end
        else:
            end = line.find(",", j)
            end = len(line) if end < 0 else end
            value, j = line[j:end].strip(), end
        out[key] = str(value)
        comma = line.find(",", j)
        i = len(line) if comma < 0 else comma + 1
    return out
