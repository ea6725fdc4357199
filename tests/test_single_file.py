"""Single-file checkpoints (original LDM / A1111 layout): converted exactly, exported offline, matching diffusers.

Tiny random models that keep each family's constants (export/random_model.py `ldm-*`) are written as single
files by sdrt's inverse name maps. diffusers' own converter (`from_single_file(file, config=<folder>)`) must read
those files back bit for bit, which checks the maps independently; then sdrt exports each file and its images
must match diffusers' pipeline on the original folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, run_sdrt
from sdrt.export.checkpoint import SourceOptions, load_modules, open_checkpoint
from sdrt.export.exporter import ExportOptions, export
from sdrt.export.random_model import write_random_checkpoint
from sdrt.export.single_file import to_single_file
from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import MANIFEST_FILE, Manifest
from sdrt.runtime.pipeline import Pipeline
from test_families import NEGATIVE, PROMPTS, ZH_NEGATIVE, ZH_PROMPTS, _latents, _txt2img_parity

FAMILIES = {"ldm-sd1": "sd1", "ldm-sd2-v": "sd2", "ldm-sdxl": "sdxl", "ldm-taiyi": "taiyi"}
PIPELINE = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "taiyi": "StableDiffusionPipeline",
            "sdxl": "StableDiffusionXLPipeline"}
# The tiny models are 64 px models; the families' own native sizes (512..1024 px) would make the export's
# validation at twice the native size slow, so every export here passes --native-size (which it also tests).
NATIVE = 64
WEIGHTED = ("text_encoder", "text_encoder_2", "unet", "vae")


class LdmFile:
    """A tiny model's diffusers folder, its modules, and its single-file tensors."""

    def __init__(self, root, name: str):
        self.name, self.family = name, FAMILIES[name]
        self.folder = write_random_checkpoint(root / "folder", name)
        self.modules = load_modules(open_checkpoint(self.folder))
        self.tensors = to_single_file(self.modules, self.family)
        self.file = root / f"{name}.safetensors"
        save_file(self.tensors, str(self.file))

    def options(self, **kw) -> SourceOptions:
        tokenizer = str(self.folder / "tokenizer") if self.family == "taiyi" else None
        return SourceOptions(**{"native_size": NATIVE, "tokenizer": tokenizer, **kw})

    def write(self, path, tensors: dict | None = None, **wrapped):
        """The file's tensors (or `tensors`) at `path`: .safetensors, or a torch pickle with `wrapped` entries."""
        tensors = self.tensors if tensors is None else tensors
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        else:
            torch.save({**wrapped, "state_dict": tensors}, path)
        return path


@pytest.fixture(scope="session")
def ldm(tmp_path_factory):
    built: dict[str, LdmFile] = {}

    def get(name: str) -> LdmFile:
        if name not in built:
            built[name] = LdmFile(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


def _assert_same_weights(expected: dict, got: dict, cast=None) -> None:
    for name in WEIGHTED:
        if name not in expected:
            continue
        a, b = expected[name].state_dict(), got[name].state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            want = a[k] if cast is None else a[k].to(cast).float()
            assert torch.equal(want, b[k]), f"{name}.{k}"


# --- the name maps -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ldm-sd1", "ldm-sd2-v", "ldm-sdxl"])
def test_diffusers_reads_our_single_files_exactly(ldm, name):
    """diffusers' converter, given the folder's configs, recovers every weight of the file sdrt wrote."""
    import diffusers

    f = ldm(name)
    cls = getattr(diffusers, PIPELINE[f.family])
    kw = {} if f.family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    theirs = cls.from_single_file(str(f.file), config=str(f.folder), local_files_only=True, **kw)
    _assert_same_weights(f.modules, {n: getattr(theirs, n) for n in WEIGHTED if hasattr(theirs, n)})


def test_taiyi_single_file_layout(ldm):
    """Taiyi: UNet and VAE as diffusers converts them; the BERT under cond_stage_model.transformer. (Fengshenbang)."""
    import diffusers

    f = ldm("ldm-taiyi")
    for cls, sub in ((diffusers.UNet2DConditionModel, "unet"), (diffusers.AutoencoderKL, "vae")):
        theirs = cls.from_single_file(str(f.file), config=str(f.folder), subfolder=sub, local_files_only=True)
        _assert_same_weights({sub: f.modules[sub]}, {sub: theirs})
    bert = {k.removeprefix("cond_stage_model.transformer."): v for k, v in f.tensors.items()
            if k.startswith("cond_stage_model.")}
    assert bert.keys() == f.modules["text_encoder"].state_dict().keys()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sdrt_reads_the_file_back_exactly(ldm, name):
    f = ldm(name)
    ckpt = open_checkpoint(f.file, f.options())
    assert ckpt.family == f.family and ckpt.single_file.detected["family"] == f.family
    got = load_modules(ckpt)
    _assert_same_weights(f.modules, got)
    # The configuration read from the shapes is the folder's, wherever it matters to the computation.
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "addition_time_embed_dim"):
        assert got["unet"].config.get(key) == f.modules["unet"].config.get(key) or (
            list(got["unet"].config.get(key)) == list(f.modules["unet"].config.get(key))), key
    for enc in ("text_encoder", "text_encoder_2"):
        if enc in f.modules:
            a, b = f.modules[enc].config, got[enc].config
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "vocab_size",
                        "max_position_embeddings", "eos_token_id"):
                assert getattr(a, key) == getattr(b, key), (enc, key)


def test_family_defaults_when_the_file_says_nothing(ldm):
    """Prediction type and native size: the families' defaults, as diffusers' single-file rules give them."""
    expected = {"ldm-sd1": ("epsilon", 512), "ldm-sd2-v": ("v_prediction", 768), "ldm-sdxl": ("epsilon", 1024),
                "ldm-taiyi": ("epsilon", 512)}
    for name, (prediction, native) in expected.items():
        ckpt = open_checkpoint(ldm(name).file)
        d = ckpt.single_file.detected
        assert (d["prediction_type"], d["native_size"]) == (prediction, native), name
        assert ckpt.unet_config["sample_size"] == native // 8
    # --prediction-type and --native-size win; SD 2.x epsilon files are the 512-base release.
    ckpt = open_checkpoint(ldm("ldm-sd2-v").file, SourceOptions(prediction_type="epsilon"))
    assert (ckpt.single_file.detected["prediction_type"], ckpt.single_file.detected["native_size"]) == ("epsilon", 512)
    assert ckpt.single_file.scheduler[1]["prediction_type"] == "epsilon"


# --- file variants -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,suffix", [(torch.float16, ".safetensors"), (torch.bfloat16, ".ckpt")])
def test_half_precision_files(ldm, tmp_path, dtype, suffix):
    f = ldm("ldm-sd1")
    path = f.write(tmp_path / f"half{suffix}", {k: v.to(dtype) for k, v in f.tensors.items()}, global_step=1)
    ckpt = open_checkpoint(path, f.options())
    assert ckpt.single_file.detected["dtypes"] == [str(dtype).removeprefix("torch.")]
    _assert_same_weights(f.modules, load_modules(ckpt), cast=dtype)


def test_ema_copy_is_used_unless_no_ema(ldm, tmp_path):
    """A file with training and EMA UNet weights (v1-5-pruned.ckpt): the EMA copy by default, as for inference."""
    f = ldm("ldm-sd1")
    gen = torch.Generator().manual_seed(3)
    both = dict(f.tensors)
    for k, v in f.tensors.items():
        if k.startswith("model.diffusion_model."):
            both[k] = v + torch.randn(v.shape, generator=gen)  # the training weights differ
            both["model_ema." + k.removeprefix("model.").replace(".", "")] = v
    both["model_ema.decay"], both["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    path = f.write(tmp_path / "both.safetensors", both)
    ckpt = open_checkpoint(path, f.options())
    assert ckpt.single_file.detected["ema"] is True
    _assert_same_weights({"unet": f.modules["unet"]}, load_modules(ckpt))
    ckpt = open_checkpoint(path, f.options(ema=False))
    assert ckpt.single_file.detected["ema"] is False
    trained = load_modules(ckpt)["unet"].state_dict()
    assert torch.equal(trained["conv_in.weight"], both["model.diffusion_model.input_blocks.0.0.weight"])


@pytest.mark.parametrize("name", ["ldm-sd1", "ldm-sdxl"])
def test_ema_only_file_is_read_under_the_unets_names(ldm, tmp_path, name):
    """A file whose UNet exists only as LitEma's flattened copy (model_ema.diffusion_modelinput_blocks00weight)."""
    from sdrt.export.ldm_keys import ema_key

    f = ldm(name)
    ema_only = {ema_key(k) if k.startswith("model.diffusion_model.") else k: v for k, v in f.tensors.items()}
    ema_only["model_ema.decay"], ema_only["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    path = f.write(tmp_path / "ema_only.safetensors", ema_only)
    ckpt = open_checkpoint(path, f.options())
    assert ckpt.family == f.family and ckpt.single_file.detected["ema"] is True
    _assert_same_weights(f.modules, load_modules(ckpt))
    assert ckpt.single_file.file.unused() == {"model_ema": 2}  # decay and num_updates


def test_wrapped_lightning_ckpt_loads_weights_only(ldm, tmp_path):
    """A Lightning .ckpt (state_dict, global_step, a pickled callback object) loads without running its code;
    SD 2.x's global_step 875000 means the 512-base epsilon release."""
    f = ldm("ldm-sd2-v")
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best = 1.0

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__)
    for n in names:
        sys.modules[n] = module
    try:
        path = f.write(tmp_path / "sd2.ckpt", global_step=875000, callbacks={"ModelCheckpoint": ModelCheckpoint()})
    finally:
        for n in names:
            del sys.modules[n]
    ckpt = open_checkpoint(path, SourceOptions())
    d = ckpt.single_file.detected
    assert (d["prediction_type"], d["native_size"]) == ("epsilon", 512)
    _assert_same_weights(f.modules, load_modules(ckpt))


def test_code_carrying_pickle_is_refused(ldm, tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = ldm("ldm-sd1").write(tmp_path / "evil.ckpt", payload=Payload())
    with pytest.raises(UserError, match=r"refused .*the pickle names (io|builtins)\.open"):
        open_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_old_clip_layout_without_text_model(ldm, tmp_path):
    """The oldest SD 1.x files store CLIP without transformers' `text_model.` level."""
    f = ldm("ldm-sd1")
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in f.tensors.items()}
    path = f.write(tmp_path / "old.safetensors", old)
    _assert_same_weights(f.modules, load_modules(open_checkpoint(path, f.options())))


# --- --vae -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vae(ldm, tmp_path_factory):
    """A second random VAE in three layouts: LDM names without prefix, diffusers names, a diffusers folder."""
    from sdrt.export.ldm_keys import vae_slots, write_state_dict
    from sdrt.export.random_model import CONFIGS, build_vae

    torch.manual_seed(1)
    vae = build_vae(CONFIGS["ldm-sd1"]).eval()
    root = tmp_path_factory.mktemp("vae")
    ldm_names = write_state_dict(vae.state_dict(), vae_slots(4, prefix=""))
    save_file(ldm_names, str(root / "vae-ft-mse.safetensors"))
    save_file(vae.state_dict(), str(root / "diffusers_names.safetensors"))
    vae.save_pretrained(root / "folder")
    return vae, root


@pytest.mark.parametrize("layout", ["vae-ft-mse.safetensors", "diffusers_names.safetensors", "folder"])
def test_vae_override_replaces_the_baked_one(ldm, other_vae, layout):
    vae, root = other_vae
    f = ldm("ldm-sd1")
    got = load_modules(open_checkpoint(f.file, f.options(vae=str(root / layout))))
    _assert_same_weights({"vae": vae, "unet": f.modules["unet"]}, got)
    assert got["vae"].config.scaling_factor == 0.18215


def test_vae_override_on_a_folder_and_a_file_without_vae(ldm, other_vae, tmp_path):
    vae, root = other_vae
    f = ldm("ldm-sd1")
    got = load_modules(open_checkpoint(f.folder, SourceOptions(vae=str(root / "vae-ft-mse.safetensors"))))
    _assert_same_weights({"vae": vae}, got)
    no_vae = f.write(tmp_path / "no_vae.safetensors",
                     {k: v for k, v in f.tensors.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(UserError, match="has no VAE .*--vae"):
        open_checkpoint(no_vae)
    got = load_modules(open_checkpoint(no_vae, f.options(vae=str(root / "vae-ft-mse.safetensors"))))
    _assert_same_weights({"vae": vae, "unet": f.modules["unet"]}, got)


# --- export and parity with diffusers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(ldm, tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            f = ldm(name)
            out = tmp_path_factory.mktemp(f"{name}-engine") / "engine"
            export(ExportOptions(checkpoint=str(f.file), out=out, source=f.options()), log=lambda s: None)
            built[name] = f, Pipeline.load(out, "cpu")
        return built[name]

    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_single_file_export_matches_diffusers_on_the_folder(engines, shared_noise, name):
    f, pipe = engines(name)
    prompts, negative = (ZH_PROMPTS, [ZH_NEGATIVE, ""]) if f.family == "taiyi" else (PROMPTS, NEGATIVE)
    ours = _txt2img_parity(PIPELINE[f.family], f.folder, pipe, prompts, negative, _latents(5, 2, 64, 64),
                           steps=6, noise=shared_noise, guidance_scale=6.0)
    assert ours.shape == (2, 64, 64, 3) and ours.std() > 0.01
    m = pipe.manifest
    assert m.family == f.family and m.native_resolution == (NATIVE, NATIVE)
    assert m.source["format"] == "single-file" and m.source["overrides"]["native_size"] == NATIVE


def test_manifest_and_inspect_show_the_single_file(engines, tmp_path):
    f, pipe = engines("ldm-sd2-v")
    digest = "sha256:" + hashlib.sha256(f.file.read_bytes()).hexdigest()
    source = json.loads((pipe.engine_dir / MANIFEST_FILE).read_text())["source"]
    assert source["fingerprint"] == digest and source["detected"]["prediction_type"] == "v_prediction"
    # What diffusers drops too: OpenCLIP's last block (12 tensors) and its text projection.
    assert source["detected"]["unused_tensors"] == {"cond_stage_model.model": 13}
    assert pipe.manifest.scheduler["prediction_type"] == "v_prediction"
    r = run_sdrt("inspect", str(pipe.engine_dir))
    assert r.returncode == 0, r.stderr
    assert f"single file {f.file.resolve()}" in r.stdout and digest in r.stdout
    assert "v_prediction (the SD 2.x default (768-v))" in r.stdout and "native_size 64" in r.stdout
    assert "13 tensors unused (cond_stage_model.model.* 13)" in r.stdout


def test_cli_export_with_vae_override_and_prediction_type(ldm, other_vae, tmp_path):
    vae, root = other_vae
    f = ldm("ldm-sd1")
    override = root / "vae-ft-mse.safetensors"
    r = run_sdrt("export", "--checkpoint", str(f.file), "--out", str(tmp_path / "e"), "--vae", str(override),
                 "--native-size", "64", "--prediction-type", "v_prediction",
                 "--components", "vae_decoder", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "single file: sd1" in r.stderr
    m = Manifest.load(tmp_path / "e")
    assert m.source["vae"]["fingerprint"] == "sha256:" + hashlib.sha256(override.read_bytes()).hexdigest()
    assert m.source["overrides"]["prediction_type"] == "v_prediction"
    assert m.scheduler["prediction_type"] == "v_prediction"
    # The engine's decoder is the override's: ONNX Runtime on the graph against the override in torch.
    import onnxruntime as ort

    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    sess = ort.InferenceSession(str(tmp_path / "e" / m.components["vae_decoder"].artifact().file))
    ours = sess.run(None, {sess.get_inputs()[0].name: latent})[0]
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(latent)).sample.numpy()
    assert np.abs(ours - theirs).max() < 1e-3


# --- refusals ----------------------------------------------------------------------------------------

def _edited(f: LdmFile, drop: str = "", **replace) -> dict:
    out = {k: v for k, v in f.tensors.items() if not (drop and k.startswith(drop))}
    out.update(replace)
    return out


REFUSALS = {
    "inpaint": (lambda f: _edited(f, **{"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
                "sd-inpaint"),
    "controlnet": (lambda f: {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
                              "control_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, "ControlNet"),
    "refiner": (lambda f: _edited(f, drop="cond_stage_model.", **{
        "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(10, 8)}), "sdxl-refiner"),
    "sd3": (lambda f: {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)}, "SD3"),
    "vae only": (lambda f: {k.removeprefix("first_stage_model."): v for k, v in f.tensors.items()
                            if k.startswith("first_stage_model.")}, "a VAE file"),
    "unet only": (lambda f: _edited(f, drop="cond_stage_model."), "no text encoder"),
    "no unet": (lambda f: _edited(f, drop="model.diffusion_model."), "no Stable Diffusion UNet"),
    "missing tensor": (lambda f: _edited(f, drop="model.diffusion_model.out.2.bias"), "out.2.bias"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_files_get_one_line_and_nothing_written(ldm, tmp_path, case):
    make, needle = REFUSALS[case]
    f = ldm("ldm-sd1")
    path = f.write(tmp_path / "model.safetensors", make(f))
    r = run_sdrt("export", "--checkpoint", str(path), "--out", str(tmp_path / "e"), "--native-size", "64")
    assert_one_line_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_lora_truncated_and_tokenizerless_files_are_refused(ldm, tmp_path):
    f = ldm("ldm-sd1")
    r = run_sdrt("export", "--checkpoint", "demo/lora/sks_kohya.safetensors", "--out", str(tmp_path / "e"))
    assert_one_line_error(r, "LoRA file", "--lora")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(f.file.read_bytes()[: f.file.stat().st_size // 2])
    r = run_sdrt("export", "--checkpoint", str(truncated), "--out", str(tmp_path / "e"))
    assert_one_line_error(r, "truncated")
    r = run_sdrt("export", "--checkpoint", str(ldm("ldm-taiyi").file), "--out", str(tmp_path / "e"),
                 "--native-size", "64")
    assert_one_line_error(r, "Taiyi", "--tokenizer")
    r = run_sdrt("export", "--checkpoint", str(f.file), "--out", str(tmp_path / "e"), "--vae",
                 str(tmp_path / "nowhere.safetensors"))
    assert_one_line_error(r, "--vae", "not found")
    assert not (tmp_path / "e").exists()


def test_clip_vocabulary_must_fit_the_text_encoder(ldm, tmp_path):
    """A text encoder whose table is smaller than sdrt's CLIP vocabulary needs the checkpoint's own tokenizer."""
    f = ldm("ldm-sd1")
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    path = f.write(tmp_path / "small_vocab.safetensors", _edited(f, **{key: f.tensors[key][:1000]}))
    with pytest.raises(UserError, match="49408 tokens .*--tokenizer"):
        load_modules(open_checkpoint(path, f.options()))


def test_single_file_folder_flags_are_refused_for_folders(ldm):
    with pytest.raises(UserError, match="single-file"):
        open_checkpoint(ldm("ldm-sd1").folder, SourceOptions(ema=False))
    with pytest.raises(UserError, match="--prediction-type eps: choose from epsilon, v_prediction"):
        open_checkpoint(ldm("ldm-sd1").file, SourceOptions(prediction_type="eps"))


def test_random_single_file_writer_round_trips(tmp_path):
    from sdrt.export.random_model import write_random_single_file

    path = write_random_single_file(tmp_path / "m.safetensors", "ldm-sd1", seed=4)
    tensors = load_file(str(path))
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert open_checkpoint(path).family == "sd1"


def test_bench_baseline_runs_the_single_file_through_diffusers(engines, tmp_path):
    """`sdrt bench --baseline diffusers` on a single-file engine dir: diffusers' pipeline around the modules the
    export read (the manifest's overrides repeated), and its images agree with sdrt's (bench's weight check)."""
    f, pipe = engines("ldm-sd1")
    out = tmp_path / "bench.json"
    r = run_sdrt("bench", str(pipe.engine_dir), "--baseline", "diffusers", "--backend", "cpu", "--steps", "2",
                 "--runs", "1", "--warmup", "0", "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [x["name"] for x in report["results"]] == ["sdrt-ort-cpu", "diffusers-torch-fp32"]


def _comparable(engine) -> dict:
    """An engine dir's manifest without what must differ between two exports of the same weights."""
    m = json.loads((engine / MANIFEST_FILE).read_text())
    for name in ("source", "versions"):
        m.pop(name)
    for c in m["components"].values():
        for a in c["artifacts"]:
            a.pop("validation"), a.pop("bytes")
    return m


def test_single_file_and_folder_give_the_same_engine_dir(engines, tmp_path):
    f, pipe = engines("ldm-sd1")
    export(ExportOptions(checkpoint=str(f.folder), out=tmp_path / "folder-engine",
                         source=SourceOptions(native_size=NATIVE)), log=lambda s: None)
    assert _comparable(pipe.engine_dir) == _comparable(tmp_path / "folder-engine")
    folder_engine = tmp_path / "folder-engine"
    assert (pipe.engine_dir / "tokenizer.json").read_bytes() == (folder_engine / "tokenizer.json").read_bytes()
    ours, theirs = (json.loads((e / "scheduler.json").read_text()) for e in (pipe.engine_dir, folder_engine))
    assert ours["alphas_cumprod"] == theirs["alphas_cumprod"]
    assert {k: v for k, v in ours["config"].items() if not k.startswith("_")} == \
        {k: v for k, v in theirs["config"].items() if not k.startswith("_")}


def test_folder_overrides_prediction_type_and_native_size(ldm, tmp_path):
    f = ldm("ldm-sd1")
    with pytest.raises(UserError, match="--native-size 72 is not a multiple of 16"):
        export(ExportOptions(checkpoint=str(f.folder), out=tmp_path / "e", source=SourceOptions(native_size=72)))
    assert not (tmp_path / "e").exists()
    m = export(ExportOptions(checkpoint=str(f.folder), out=tmp_path / "e", components=("text_encoder",),
                             source=SourceOptions(prediction_type="v_prediction", native_size=128)), log=lambda s: None)
    assert m.scheduler["prediction_type"] == "v_prediction" and m.native_resolution == (128, 128)
    assert m.source["format"] == "diffusers" and m.source["overrides"] == {"prediction_type": "v_prediction",
                                                                            "native_size": 128}
    config = json.loads((tmp_path / "e" / "scheduler.json").read_text())["config"]
    assert config["prediction_type"] == "v_prediction"


def test_modelspec_metadata_says_prediction_type_and_size(ldm, tmp_path):
    """Stability AI Model Spec keys in the header (kohya and Stability write them) beat the family defaults."""
    f = ldm("ldm-sd2-v")
    path = tmp_path / "v2-512.safetensors"
    save_file(f.tensors, str(path), metadata={"modelspec.sai_model_spec": "1.0.0",
                                              "modelspec.architecture": "stable-diffusion-v2-512",
                                              "modelspec.prediction_type": "epsilon",
                                              "modelspec.resolution": "512x512"})
    d = open_checkpoint(path).single_file.detected
    assert (d["prediction_type"], d["native_size"]) == ("epsilon", 512)
    assert d["prediction_type_from"] == d["native_size_from"] == "the file's modelspec metadata"
    d = open_checkpoint(path, SourceOptions(prediction_type="v_prediction", native_size=64)).single_file.detected
    assert (d["prediction_type"], d["native_size"]) == ("v_prediction", 64)


def test_lora_merges_into_a_single_file_as_into_its_folder(ldm, tmp_path):
    """kohya LoRA (SDXL: both text encoders, UNet in sd-scripts' SGM names) on modules read from a single file:
    the merged weights equal the same merge on the folder's modules, OpenCLIP's split q/k/v included."""
    from lora_factory import random_entries, write_kohya
    from sdrt.export.lora_merge import LoraSpec, merge_loras
    from sdrt.export.lora_sgm import sgm_module_names

    f = ldm("ldm-sdxl")
    ours = load_modules(open_checkpoint(f.file, f.options()))
    theirs = load_modules(open_checkpoint(f.folder))
    path = write_kohya(random_entries(theirs, seed=5), tmp_path / "xl.safetensors", te_prefix="lora_te1_",
                       unet_names=sgm_module_names(theirs["unet"]))
    records = [merge_loras((LoraSpec(path, 0.8),), m, False, lambda s: None) for m in (ours, theirs)]
    assert records[0][0].modules_changed == records[1][0].modules_changed
    assert all(n > 0 for n in records[0][0].modules_changed.values())
    _assert_same_weights(theirs, ours)
