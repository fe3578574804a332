"""MODEL arguments -> a ready pipeline, and the keyword arguments of one sampling call.

MODEL is
- a Hugging Face hub id (`genmo/mochi-1-preview`) or a local folder holding a diffusers pipeline
  (`model_index.json`), loaded with the stock `DiffusionPipeline.from_pretrained`;
- `tiny:<family>` (e.g. `tiny:wan`): a tiny random-weight pipeline of that family from `stg_ext.testing.tiny`, built
  in memory. It is the same stock pipeline class as the real model, so the demo and the tests run the code
  path real models run, offline and in seconds (its videos are noise: the weights are random).
- `world`: the world model shipped in the package (stg_ext/world/model, a WanPipeline folder trained on
  stg_ext.world by scripts/train_world_model.py), loaded from that folder like any other pipeline folder.

A pipeline folder may hold `stg_ext.json` next to model_index.json: {"call": {...}} gives the pipeline keyword
arguments the model was trained for (height, width, num_frames, max_sequence_length, guidance_scale,
num_inference_steps); command-line options override them. diffusers ignores the file.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from diffusers import DiffusionPipeline

from ..guidance import specs
from ..testing.tiny import FAMILIES, tiny_pipeline
from ..weak.adapters import get_adapter
from ..world import model_path
from .errors import CLIError, UsageError, one_line

logger = logging.getLogger("stg_ext.cli")

TINY_PREFIX = "tiny:"
WORLD = "world"  # the packaged world model (stg_ext.world.model_path())
CARD = "stg_ext.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLOAD = ("none", "model", "sequential")


@dataclass
class LoadOptions:
    dtype: str = "auto"  # "auto": bfloat16 on an accelerator, float32 on CPU
    device: str = "auto"  # "auto": cuda, else mps, else cpu
    offload: str = "none"  # none | model | sequential (diffusers' CPU offload; needs an accelerator)
    vae_tiling: bool = False
    progress: bool = True  # pipeline progress bars
    threads: Optional[int] = None  # torch CPU threads; None: torch's default, but 1 for tiny models


@dataclass
class Model:
    """A loaded pipeline and how to call it."""

    name: str
    pipe: Any
    device: str
    tiny: Any = None  # the stg_ext.testing.tiny.TinyPipeline for `tiny:<family>`, else None
    progress: bool = True  # show the pipeline's progress bars
    card: Dict[str, Any] = field(default_factory=dict)  # the folder's stg_ext.json, if any
    _params: Dict[str, inspect.Parameter] = field(default_factory=dict, repr=False)
    _told_no_prompt: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._params = dict(inspect.signature(type(self.pipe).__call__).parameters)

    # --- what the pipeline is -----------------------------------------------------------------------------

    def accepts(self, name: str) -> bool:
        return name in self._params or any(p.kind is p.VAR_KEYWORD for p in self._params.values())

    @property
    def takes_prompt(self) -> bool:
        if self.tiny is not None:
            return getattr(self.pipe, "text_encoder", None) is not None
        return "prompt" in self._params

    @property
    def needs_image(self) -> bool:
        """Image-to-video pipelines whose `image` argument has no default."""
        p = self._params.get("image")
        return p is not None and p.default is inspect.Parameter.empty

    def denoisers(self) -> Dict[str, torch.nn.Module]:
        """The pipeline's denoiser modules STG patches, by attribute name."""

        try:
            names = specs.get_spec(self.pipe).denoisers
        except TypeError:
            names = ("transformer", "unet")
        found = {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}
        if not found:
            raise CLIError(f"{self.name}: the pipeline ({type(self.pipe).__name__}) has no denoiser loaded")
        return found

    def num_layers(self) -> int:
        """STG layers of the (first) denoiser, as stg_ext addresses them."""

        model = next(iter(self.denoisers().values()))
        try:
            return len(get_adapter(model).layers(model))
        except TypeError as e:
            raise CLIError(one_line(e)) from None

    def convention(self) -> str:
        return specs.get_spec(self.pipe).convention

    # --- one call ---------------------------------------------------------------------------------------

    def call_kwargs(self, *, prompt: Optional[str], seed: int, steps: int, image: Any = None,
                    negative_prompt: Optional[str] = None, height: Optional[int] = None, width: Optional[int] = None,
                    num_frames: Optional[int] = None, guidance_scale: Optional[float] = None,
                    extra: Optional[Dict[str, Any]] = None) -> dict:
        """Keyword arguments for `pipe(**kw)`: one video as float frames (`output_type="np"`), the noise drawn
        from a CPU generator seeded with `seed` (the same seed gives the same noise on every device)."""
        if self.tiny is not None:
            kw = self.tiny.call_kwargs(seed=seed, steps=steps, cfg=True, output_type="np",
                                       **({"prompt": prompt} if self.takes_prompt and prompt is not None else {}))
        else:
            kw = {k: v for k, v in self.card.get("call", {}).items() if k != "num_inference_steps"}
            kw.update(num_inference_steps=steps, output_type="np", generator=torch.Generator("cpu").manual_seed(seed))
            if prompt is not None and "prompt" in self._params:
                kw["prompt"] = prompt
        if prompt is not None and self.tiny is None and not self.takes_prompt and not self._told_no_prompt:
            logger.info("%s (%s) takes no text prompt: the prompt is not used", self.name, type(self.pipe).__name__)
            self._told_no_prompt = True
        if image is None and self.needs_image and "image" not in kw:
            raise UsageError(f"{self.name} ({type(self.pipe).__name__}) is an image-to-video pipeline: pass --image")
        # Latte calls the frame count video_length.
        frames_key = "num_frames" if "num_frames" in self._params else "video_length"
        options = [("negative_prompt", "--negative-prompt", negative_prompt), ("image", "--image", image),
                   ("height", "--height", height), ("width", "--width", width),
                   (frames_key, "--num-frames", num_frames), ("guidance_scale", "--guidance-scale", guidance_scale)]
        options += [(key, f"--call-arg {key}=...", value) for key, value in (extra or {}).items()]
        for key, option, value in options:
            if value is not None:
                self._require(key, option)
                kw[key] = value
        return kw

    def _require(self, name: str, option: str) -> None:
        if not self.accepts(name):
            raise UsageError(f"{option}: {type(self.pipe).__name__} takes no '{name}' argument")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(spec: str, options: Optional[LoadOptions] = None) -> Model:
    options = options or LoadOptions()
    if options.offload not in OFFLOAD:
        raise UsageError(f"--offload {options.offload!r}: choose from {', '.join(OFFLOAD)}")
    device = resolve_device(options.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    dtype = resolve_dtype(options.dtype, device)
    if options.offload != "none" and device == "cpu":
        raise UsageError("--offload moves weights between the CPU and an accelerator: it needs --device cuda (or "
                         "another accelerator); on the CPU the whole pipeline already lives in memory")
    threads = options.threads
    if threads is None and (spec.startswith(TINY_PREFIX) or spec == WORLD):
        # The tiny models' ops (and the world model's) are far too small for a second thread to pay: on a busy
        # 2-core machine two threads made the demo ~10x slower than one, and the timings noisy.
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    if spec.startswith(TINY_PREFIX):
        model = _load_tiny(spec)
    else:
        path = world_path() if spec == WORLD else spec
        model = Model(name=spec, pipe=_from_pretrained(path, dtype), device=device, card=read_card(path))
    pipe = model.pipe
    try:
        if options.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif options.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        if model.tiny is not None and dtype != torch.float32:
            pipe.to(dtype=dtype)
    except (RuntimeError, ValueError, AssertionError, ImportError) as e:
        raise CLIError(f"cannot place {spec} on {device} (offload: {options.offload}): {one_line(e)}") from e
    if options.vae_tiling:
        vae = getattr(pipe, "vae", None)
        if vae is None or not hasattr(vae, "enable_tiling"):
            raise UsageError(f"--vae-tiling: {spec}'s VAE does not support tiled decoding")
        vae.enable_tiling()
    pipe.set_progress_bar_config(disable=not options.progress)
    model.device, model.progress = device, options.progress
    return model


def _load_tiny(spec: str) -> Model:
    family = spec[len(TINY_PREFIX):]
    if family not in FAMILIES:
        raise UsageError(f"unknown tiny model {spec!r}; tiny models: {', '.join(TINY_PREFIX + f for f in FAMILIES)}")
    try:
        tp = tiny_pipeline(family, text_encoder=True)
    except NotImplementedError:
        # No tiny text encoder for this family: the conditioning is random embeddings drawn from the seed.
        tp = tiny_pipeline(family, text_encoder=False)
        logger.info("%s has no tiny text encoder: prompts are replaced by random embeddings drawn from the seed",
                    spec)
    return Model(name=spec, pipe=tp.pipe, device="cpu", tiny=tp)


def world_path() -> str:
    path = model_path()
    if not (path / "model_index.json").exists():
        raise CLIError(f"the world model is missing from this installation (no {path / 'model_index.json'}); "
                       "train it with scripts/train_world_model.py or reinstall stg_ext")
    return str(path)


def read_card(spec: str) -> Dict[str, Any]:
    """The folder's stg_ext.json ({} for hub ids and folders without one)."""

    path = os.path.join(os.path.expanduser(spec), CARD)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            card = json.load(fh)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path!r}: {one_line(e)}") from None
    if not isinstance(card, dict) or not isinstance(card.get("call", {}), dict):
        raise CLIError(f"{path!r}: expected an object with an optional \"call\" object")
    return card


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator, or starting like a path, is a path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _from_pretrained(spec: str, dtype: torch.dtype) -> Any:
    from huggingface_hub import constants

    path = os.path.expanduser(spec)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CLIError(f"{spec!r} is a file; MODEL is a hub id, a pipeline folder or tiny:<family>")
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise CLIError(f"{spec!r} is not a diffusers pipeline folder (it has no model_index.json)")
    elif _looks_like_path(spec):
        raise CLIError(f"no such folder: {spec!r}")
    try:
        return DiffusionPipeline.from_pretrained(path if os.path.exists(path) else spec, torch_dtype=dtype)
    except Exception as e:  # hub, file-system and config errors all end here: say which, in one line
        raise CLIError(_load_failure(spec, e, os.path.exists(path), constants.HF_HUB_OFFLINE)) from e


def _load_failure(spec: str, error: Exception, local: bool, offline: bool) -> str:
    if local:
        return f"cannot load the pipeline in {spec!r}: {one_line(error)[:400]}"
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    if offline and ("not fully cached" in text or "LocalEntryNotFoundError" in names
                    or "outgoing traffic has been disabled" in text):
        return (f"cannot load {spec!r}: it is not a local folder and not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it (pass a local pipeline folder, unset HF_HUB_OFFLINE, or "
                "use tiny:<family> to run offline)")
    if "RepositoryNotFoundError" in names or "404" in text:
        return f"cannot load {spec!r}: no such model on the Hugging Face hub (or it is private: log in first)"
    if "GatedRepoError" in names:
        return f"cannot load {spec!r}: the model is gated; accept its terms on the hub and log in first"
    if "HFValidationError" in names:
        return f"cannot load {spec!r}: not a valid hub id or an existing folder"
    return f"cannot load {spec!r}: {one_line(error)[:400]}"
