"""A1111 names and parameters text (runtime/infotext.py): fast, no engine."""

from __future__ import annotations

import pytest
from sdrt.runtime.errors import UserError
from sdrt.runtime.infotext import SAMPLERS, Infotext, from_sdrt, parse, supported_names, to_sdrt
from sdrt.runtime.schedulers import SCHEDULER_NAMES


def test_every_sdrt_scheduler_has_an_a1111_name_and_back():
    for name in SCHEDULER_NAMES:
        sampler, schedule = from_sdrt(name)
        assert to_sdrt(sampler.name, schedule) == name
        assert to_sdrt(f"{sampler.name} {schedule}") == name  # the legacy combined form
    assert {s.name for s in SAMPLERS} == {"Euler", "Euler a", "DPM++ 2M", "DDIM", "PLMS", "LMS", "UniPC", "LCM"}


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("DPM++ 2M", None, "dpmpp-2m-karras"),  # "Automatic" is Karras for DPM++ 2M since A1111 1.9
    ("DPM++ 2M", "automatic", "dpmpp-2m-karras"),
    ("DPM++ 2M", "uniform", "dpmpp-2m"),
    ("DPM++ 2M Karras", None, "dpmpp-2m-karras"),
    ("k_dpmpp_2m", "Karras", "dpmpp-2m-karras"),
    ("euler a", "Automatic", "euler-a"),
    ("k_euler_a", None, "euler-a"),
    ("PLMS", None, "pndm"),
    ("LMS", "", "lms"),
])
def test_a1111_names_map_to_sdrt(sampler, schedule, expected):
    assert to_sdrt(sampler, schedule) == expected


@pytest.mark.parametrize("sampler, schedule, needle", [
    ("Heun", None, "unknown sampler 'Heun'"),
    ("DPM++ SDE Karras", None, "unknown sampler"),
    ("Euler", "Karras", "is not supported"),
    ("Euler", "beta", "unknown schedule type 'beta'"),
])
def test_unsupported_names_list_the_supported_ones(sampler, schedule, needle):
    with pytest.raises(UserError, match=needle) as e:
        to_sdrt(sampler, schedule)
    assert "Euler a" in str(e.value) or "Karras" in str(e.value)
    assert "DPM++ 2M Karras" in supported_names()


def test_parameters_text_round_trips_with_separators_in_values():
    info = Infotext("a red, circle: big", "blurry, dark", 20, "dpmpp-2m-karras", 7.0, 42, 512, 768,
                    "my, model", 0.75, 0.7)
    text = info.text()
    assert text.splitlines()[:2] == ["a red, circle: big", "Negative prompt: blurry, dark"]
    assert ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x768, "
            'Model: "my, model", Denoising strength: 0.75, Guidance rescale: 0.7') == text.splitlines()[2]
    back = parse(text)
    assert back["Prompt"] == "a red, circle: big" and back["Negative prompt"] == "blurry, dark"
    assert back["Model"] == "my, model" and back["Schedule type"] == "Karras" and back["Seed"] == "42"


def test_samplers_with_one_schedule_write_no_schedule_type():
    text = Infotext("x", "", 3, "euler", 6.5, 5, 64, 64, "m").text()
    assert text == "x\nSteps: 3, Sampler: Euler, CFG scale: 6.5, Seed: 5, Size: 64x64, Model: m"
    assert parse(text)["Prompt"] == "x" and parse(text)["Negative prompt"] == ""
