"""`flux-fill predict`: one prediction offline, without a server, with a progress bar."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from .errors import InvalidInput, NonFiniteOutput, SafetyError, WeightsError
from .inputs import PredictionInput, parse_input
from .tiny import DEMO_NOTICE

FILE_INPUTS = ("image", "mask")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per input of the model, from the input model itself."""
    for name, info in PredictionInput.model_fields.items():
        annotation = info.annotation
        args = typing.get_args(annotation)
        kwargs: dict = {"help": info.description, "dest": f"input_{name}", "default": None}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif int in args or annotation is int:
            kwargs["type"] = int
        elif float in args or annotation is float:
            kwargs["type"] = float
        parser.add_argument(_flag(name), **kwargs)


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="Run one prediction offline and write the images to a folder.")
    add_input_arguments(p)
    p.add_argument("-o", "--output", default=".", help="Folder for out-<i>.<ext> (default: here).")
    p.add_argument("--weights", default="tiny", help="Weights: folder, .safetensors file, repo id, or 'tiny'.")
    p.add_argument("--components", default=None, help="With a single-file --weights: the other components.")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU when there is one).")
    p.add_argument("--lora-dir", default=None, help="Folder of named LoRAs.")
    p.add_argument("--segmenter", default=None, help="For --mask-prompt: a SAM folder and a Grounding DINO folder, "
                                                     "comma-separated, or 'tiny' (weights.md).")
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .accel import AccelError
    from .factory import EngineOptions, build_engine
    from .lora import LoraSettings
    from .tiny import default_tiny_dir

    raw = {k[len("input_"):]: v for k, v in vars(args).items() if k.startswith("input_") and v is not None}
    try:
        inp = parse_input(raw)
    except InvalidInput as exc:
        for e in exc.errors:
            print(f"error: {_flag(e.field) if e.field in PredictionInput.model_fields else e.field}: {e.description}", file=sys.stderr)
        return 2
    lora = LoraSettings(folder=Path(args.lora_dir) if args.lora_dir else None,
                        cache_dir=default_tiny_dir().parent / "loras", allow_paths=True)
    # One prediction: compiling the blocks and warming up would cost more than they save.
    options = EngineOptions(weights=args.weights, components=args.components, device=args.device, compile=False,
                            warm_up=False, allow_paths=True, lora=lora)
    try:
        engine = build_engine(options)
        if args.segmenter:
            from .segment import load_segmenter

            engine.segmenter = load_segmenter(args.segmenter, args.device)
    except (WeightsError, AccelError) as exc:
        return _fail(str(exc), 2)
    except Exception as exc:  # a failure no check foresaw: still one sentence, never a traceback
        return _fail(f"the model could not be loaded: {_sentence(exc)}", 1)
    if engine.model.demo:
        print(f"Demo model. {DEMO_NOTICE}", file=sys.stderr)
    bar = tqdm(total=None, unit="step", file=sys.stderr)

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    masks: list = []
    try:
        outputs = engine.predict(inp, on_step=on_step, log=lambda line: bar.write(line, file=sys.stderr),
                                 on_mask=masks.append)
    except InvalidInput as exc:
        bar.close()
        for e in exc.errors:
            print(f"error: {e.field}: {e.description}", file=sys.stderr)
        return 2
    except (NonFiniteOutput, SafetyError) as exc:
        bar.close()
        return _fail(str(exc), 1)
    except Exception as exc:
        bar.close()
        return _fail(f"the prediction failed: {_sentence(exc)}", 1)
    bar.close()
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    for out in [*outputs, *masks]:  # a --mask-prompt's mask is written beside the outputs
        (folder / out.name).write_bytes(out.data)
        print(folder / out.name)
    return 0


def _fail(sentence: str, code: int) -> int:
    """One sentence on stderr, never a traceback; the exit status."""
    print(f"error: {sentence}", file=sys.stderr)
    return code


def _sentence(exc: BaseException) -> str:
    """An unforeseen exception in one line: its type and the first line of its message."""
    text = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="flux-fill predict")
    sub = parser.add_subparsers(dest="command", required=True)
    add_predict_parser(sub)
    args = parser.parse_args(["predict", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
