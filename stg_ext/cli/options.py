"""Options shared by several commands, and the parsers of their values.

Each `add_*` function adds one argument group to a command's parser; `*_from_args` turns the parsed values
into what the commands use. Value parsers raise argparse.ArgumentTypeError, which argparse reports as a usage
error naming the option."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .errors import UsageError
from .loading import DTYPES, OFFLOAD, LoadOptions
from .render import STGSettings

MODES = ("attention", "residual", "spatial", "temporal")
DEFAULT_LAYER_DEPTH = 0.7


# --------------------------------------------------------------------------------------------------
# Value parsers
# --------------------------------------------------------------------------------------------------

def _layer_item(text: str) -> Union[int, str]:
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("empty layer")
    try:
        return int(text)
    except ValueError:
        return text  # a block's module path, e.g. "transformer_blocks.8"


def layer_value(text: str) -> Union[int, str, Tuple[Union[int, str], ...]]:
    """`34`, `-14`, `transformer_blocks.8`, or several layers perturbed together: `30,32`."""
    items = [_layer_item(t) for t in text.split(",")]
    return items[0] if len(items) == 1 else tuple(items)


def mode_value(text: str) -> Union[str, Tuple[str, ...]]:
    """A mode, or comma-separated modes, one perturbed pass each (factorized guidance: `spatial,temporal`)."""
    modes = tuple(m.strip() for m in text.split(","))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid mode {bad[0]!r} (choose from {', '.join(MODES)}, or "
                                         "comma-separated ones for factorized guidance)")
    return modes[0] if len(modes) == 1 else modes


def scale_value(text: str) -> Union[float, Tuple[float, ...]]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid scale {text!r}: a number, or comma-separated numbers (one per "
                                         "mode)") from None
    return values[0] if len(values) == 1 else values


def fraction_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def int_list(text: str) -> List[int]:
    """`0,1,2` or a range `0:4`."""
    out: List[int] = []
    for part in text.split(","):
        try:
            if ":" in part:
                bounds = [int(b) for b in part.split(":")]
                out.extend(range(*bounds))
            else:
                out.append(int(part))
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"invalid list {text!r}: integers like 0,1,2 or a range 0:4") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no value")
    return out


def call_arg(text: str) -> Tuple[str, Any]:
    """KEY=VALUE; VALUE is read as JSON when it parses (numbers, true/false, null, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"invalid --call-arg {text!r}: expected KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def default_layer(num_layers: int) -> int:
    """The default STG layer: a late one (appendix A3: later layers tend to work better). round(0.7 L) gives
    34 of Mochi's 48, the paper's choice."""
    return min(num_layers - 1, max(0, round(DEFAULT_LAYER_DEPTH * num_layers)))


# --------------------------------------------------------------------------------------------------
# Argument groups
# --------------------------------------------------------------------------------------------------

def add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--verbose", action="store_true",
                       help="show the warnings of diffusers and transformers (hidden by default)")
    group.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def add_model(parser: argparse.ArgumentParser, *, positional: bool = True, default: Optional[str] = None) -> None:
    help_ = ("a Hugging Face hub id (e.g. genmo/mochi-1-preview), a local folder holding a diffusers pipeline "
             "(model_index.json), or tiny:<family> (e.g. tiny:wan) for a tiny random-weight pipeline built offline")
    if positional:
        parser.add_argument("model", metavar="MODEL", help=help_)
    else:
        parser.add_argument("--model", default=default, metavar="MODEL", help=f"{help_} (default: %(default)s)")
    group = parser.add_argument_group("loading")
    group.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                       help="weights dtype (default: auto = bfloat16 on an accelerator, float32 on CPU)")
    group.add_argument("--device", default="auto", help="torch device (default: auto = cuda, else mps, else cpu)")
    group.add_argument("--offload", default="none", choices=OFFLOAD,
                       help="diffusers CPU offload: 'model' moves whole models to the device when used, 'sequential' "
                            "moves layer by layer (least memory, slowest); needs an accelerator (default: none)")
    group.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles (less memory)")
    group.add_argument("--threads", type=positive_int,
                       help="torch CPU threads (default: torch's; 1 for tiny:<family>, whose ops are too small to "
                            "gain from threads)")


def add_sampling(parser: argparse.ArgumentParser, *, steps: int, seed: bool = True,
                 prompt: bool = True) -> None:
    group = parser.add_argument_group("sampling (passed to the pipeline's __call__)")
    if prompt:
        group.add_argument("--prompt", help="the text prompt (tiny models without a text encoder draw random "
                                            "embeddings from the seed instead)")
    group.add_argument("--negative-prompt", help="the negative prompt (default: the pipeline's)")
    group.add_argument("--image", help="conditioning image file for image-to-video pipelines")
    group.add_argument("--steps", type=positive_int, default=steps,
                       help="number of inference steps (default: %(default)s)")
    if seed:
        group.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    group.add_argument("--guidance-scale", type=float,
                       help="the pipeline's guidance_scale argument, its CFG scale (default: the pipeline's)")
    group.add_argument("--height", type=positive_int, help="frame height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=positive_int, help="frame width in pixels (default: the pipeline's)")
    group.add_argument("--num-frames", type=positive_int, help="number of frames (default: the pipeline's)")
    group.add_argument("--call-arg", type=call_arg, action="append", default=[], metavar="KEY=VALUE",
                       help="any other argument of the pipeline's __call__, repeatable; VALUE is read as JSON when "
                            "it parses, else as a string (e.g. --call-arg max_sequence_length=226)")
    group.add_argument("--fps", type=float, default=8.0, help="frame rate of the written videos (default: %(default)s)")


def add_stg(parser: argparse.ArgumentParser, *, layer: bool = True, mode: str = "attention") -> None:
    group = parser.add_argument_group("STG (STG_SPEC sections 2-4)")
    if layer:
        group.add_argument("--layer", type=layer_value,
                           help="the perturbed layer: 0-based index over the denoiser's blocks in execution order "
                                "(negative: from the end), a block's module path, or several comma-separated "
                                "(default: round(0.7 x layers), 34 for Mochi's 48, the paper's choice)")
    group.add_argument("--mode", type=mode_value, default=mode,
                       help="'attention' (STG-A: self-attention map -> identity), 'residual' (STG-R: the block is "
                            "skipped), 'spatial' / 'temporal' (factorized models: one half), or comma-separated "
                            "modes, one perturbed pass each (default: %(default)s)")
    group.add_argument("--scale", type=scale_value, default=1.0,
                       help="STG scale s (comma-separated: one per mode) (default: %(default)s)")
    group.add_argument("--rescale", type=fraction_value, default=0.0,
                       help="rescale factor r in [0, 1], 0 = off (paper Algorithm 4; LTX-Video uses 0.7) "
                            "(default: %(default)s)")
    group.add_argument("--start", type=fraction_value, default=0.0,
                       help="STG runs at step i of N when start*N <= i < stop*N (default: %(default)s)")
    group.add_argument("--stop", type=fraction_value, default=1.0, help="see --start (default: %(default)s)")


# --------------------------------------------------------------------------------------------------
# From parsed arguments
# --------------------------------------------------------------------------------------------------

def load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(dtype=args.dtype, device=args.device, offload=args.offload, vae_tiling=args.vae_tiling,
                       progress=not args.quiet, threads=args.threads)


def stg_settings(args: argparse.Namespace, layer: Any) -> STGSettings:
    if args.start >= args.stop:
        raise UsageError(f"--start {args.start} must be below --stop {args.stop}: STG would never run")
    modes = args.mode if isinstance(args.mode, tuple) else (args.mode,)
    scale = args.scale
    if isinstance(scale, tuple) and len(scale) != len(modes):
        raise UsageError(f"--scale gives {len(scale)} values for {len(modes)} mode(s)")
    if len(modes) > 1 and not isinstance(scale, tuple):
        scale = (scale,) * len(modes)
    return STGSettings(layer=layer, mode=args.mode, scale=scale, rescale=args.rescale, start=args.start,
                       stop=args.stop)


def sampling_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of Model.call_kwargs that come straight from the sampling options."""
    return dict(negative_prompt=args.negative_prompt, image=load_image(args.image), height=args.height,
                width=args.width, num_frames=args.num_frames, guidance_scale=args.guidance_scale,
                extra=dict(args.call_arg))


def load_image(path: Optional[str]) -> Any:
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"--image {path!r}: cannot read it as an image ({getattr(e, 'strerror', None) or e})") from None


def check_prompts(prompts: Sequence[str]) -> List[str]:
    out = [p for p in prompts if p.strip()]
    if not out:
        raise UsageError("no prompt given")
    return out
