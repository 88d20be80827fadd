"""Typed settings for a run, built from a plain mapping (the composed Hydra config).

The library never sees Hydra or OmegaConf: `jobs/` resolves the config to plain dicts and calls
`from_mapping`, which rejects unknown keys and wrong types with a `UserError` before any work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from pipeline.errors import UserError

PRECISIONS = ("fp16", "bf16", "fp32", "int8", "auto")  # int8: engines only (model.backend)
BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cuda", "cpu")
DECODERS = ("dali", "torch", "auto")
# Both decoders resample these alike; nearest-neighbour picks different source pixels in DALI and torchvision.
INTERPOLATIONS = ("bilinear", "bicubic")
ACTIVATIONS = ("none", "sigmoid", "softmax")
HIDDEN_ACTIVATIONS = ("none", "relu", "gelu")
HEAD_INPUTS = ("embedding", "scores")  # what a head reads of its input model: `input: <model>.<one of these>`


@dataclass(frozen=True)
class ModelSettings:
    """Which model to run (a source and its architecture, weights or checkpoint) and, where given, the
    preprocessing it expects; preprocessing left null comes from the model itself."""

    source: str = "torchvision"  # torchvision | timm | open_clip | module (a module of pipeline/sources)
    name: str | None = None  # the source's architecture name
    weights: str | None = None  # the source's pretrained name or tag (torchvision: DEFAULT too); None: seeded random init
    checkpoint: str | None = None  # a state_dict file, loaded with weights_only=True, for any source
    path: str | None = None  # or a TorchScript (.pt/.ts), torch.export (.pt2) or ONNX (.onnx) file instead of a source
    module: dict | None = None  # source=module: {_target_: package.Class, **arguments}
    num_classes: int | None = None  # for a random init or a checkpoint; None: the architecture's default
    resize_size: int | None = None  # shorter side after resize; None: from the model
    crop_size: int | None = None  # center crop, square; None: from the model
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None  # bilinear | bicubic; None: from the model
    topk: int = 5
    compile: bool = False  # the same as backend=compile
    backend: str = "eager"  # eager | compile | onnxruntime | tensorrt (an .onnx path: onnxruntime unless tensorrt)
    onnx_outputs: dict | None = None  # an .onnx file's outputs for {output: …, embedding: …}, by name or position
    # With several models (`models:`), each may say these for itself; null: the run's own value.
    outputs: tuple[str, ...] | None = None  # output kinds; a head's default is [scores]
    activation: str | None = None  # scores: none | sigmoid | softmax (null: output.activation)
    normalize_embedding: bool | None = None  # null: output.normalize_embedding
    batch_size: int | None = None  # largest micro-batch this model runs at (null: the decode batch)
    # source=head: a small module on another model's output, built from `layers` or `module`
    input: str | None = None  # <model>.embedding or <model>.scores
    normalize_input: bool = False  # L2-normalise the input first (CLIP-embedding heads expect it)
    layers: tuple[int, ...] | None = None  # Linear widths after the input's, e.g. [1024, 128, 64, 16, 1]
    hidden_activation: str = "relu"  # between those Linear layers: none | relu | gelu

    def __post_init__(self):
        _check(self.interpolation is None or self.interpolation in INTERPOLATIONS,
               f"model.interpolation must be one of {'|'.join(INTERPOLATIONS)} or null, got {self.interpolation!r}")
        _check(self.crop_size is None or self.crop_size > 0, "model.crop_size must be > 0")
        _check(None in (self.crop_size, self.resize_size) or self.resize_size >= self.crop_size,
               "model.resize_size must be >= model.crop_size")
        for key in ("mean", "std"):
            value = getattr(self, key)
            _check(value is None or (len(value) == 3 and (key == "mean" or min(value) > 0)),
                   f"model.{key} needs three values" + (", all > 0" if key == "std" else ""))
        _check(self.topk >= 1, "model.topk must be >= 1")
        _check(self.backend in BACKENDS, f"model.backend must be one of {'|'.join(BACKENDS)}, got {self.backend!r}")
        _check(not self.compile or self.backend in ("eager", "compile"),
               f"model.compile=true and model.backend={self.backend}: choose one (backend=compile is compile=true)")
        onnx_file = bool(self.path) and self.path.endswith(".onnx")
        _check(not onnx_file or self.backend in ("eager", "onnxruntime", "tensorrt") and not self.compile,
               "an .onnx model.path runs with model.backend=onnxruntime or tensorrt")
        _check(self.onnx_outputs is None or (onnx_file and set(self.onnx_outputs) <= {"output", "embedding"}),
               "model.onnx_outputs is for an .onnx model.path: {output: <name or position>, embedding: <…>}")
        _check(self.num_classes is None or self.num_classes >= 1, "model.num_classes must be >= 1")
        _check(self.path is None or self.checkpoint is None, "give at most one of model.checkpoint and model.path")
        _check(self.path is not None or self.source in ("module", "head") or bool(self.name),
               f"model.name is required for model.source={self.source}")
        _check(self.activation is None or self.activation in ACTIVATIONS,
               f"model.activation must be one of {'|'.join(ACTIVATIONS)} or null")
        _check(self.batch_size is None or self.batch_size >= 1, "model.batch_size must be >= 1 or null")
        _check(self.hidden_activation in HIDDEN_ACTIVATIONS,
               f"model.hidden_activation must be one of {'|'.join(HIDDEN_ACTIVATIONS)}")
        if self.source == "head":
            _check(isinstance(self.input, str) and self.input.count(".") == 1
                   and self.input.split(".")[1] in HEAD_INPUTS,
                   f"a head needs input: <model>.embedding or <model>.scores, got {self.input!r}")
            _check((self.layers is None) != (self.module is None),
                   "a head needs exactly one of layers: [..] (Linear widths) and module: {_target_: ...}")
            _check(self.module is None or isinstance(self.module.get("_target_"), str),
                   "a head's module needs a _target_ (e.g. {_target_: mypkg.MyHead, width: 8})")
            _check(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 1),
                   "a head's layers must be positive widths, e.g. [1024, 128, 64, 16, 1]")
        else:
            _check(self.input is None and self.layers is None,
                   "model.input and model.layers are for source=head")
        _check(self.source != "module" or self.path is not None or isinstance((self.module or {}).get("_target_"), str),
               "model.source=module needs model.module with a _target_ (e.g. {_target_: mypkg.MyNet, width: 8})")

    @property
    def label(self) -> str:
        """What the model is called in logs and in the run's identity: its file, its module's class, or its name."""
        if self.path:
            return self.path
        if self.source == "head":
            return f"head({self.module['_target_'] if self.module else 'x'.join(map(str, self.layers))})"
        return self.module["_target_"] if self.source == "module" else self.name

    @property
    def engine_backend(self) -> str:
        """The backend it runs with: compile=true is backend=compile; an .onnx file runs in ONNX Runtime."""
        if self.compile:
            return "compile"
        if self.path and self.path.endswith(".onnx") and self.backend == "eager":
            return "onnxruntime"
        return self.backend

    @property
    def is_head(self) -> bool:
        return self.source == "head" and self.path is None

    @property
    def input_model(self) -> str | None:
        return self.input.split(".")[0] if self.input else None

    @property
    def source_label(self) -> str:
        return "file" if self.path else self.source


@dataclass(frozen=True)
class DataSettings:
    """Which shards to read and what a sample holds."""

    shards: str | list[str] | None = None
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    label_extension: str | None = "cls"
    max_pixels: int = 89_478_485  # decompression-bomb guard, PIL's default limit
    index_cache_dir: str | None = None  # for index files when a shard's folder is read-only
    stage_dir: str | None = None  # node-local folder remote shards are copied to, ahead of DALI
    stage_ahead: int = 4  # shards staged (or being fetched) at a time: what bounds the folder's size

    def __post_init__(self):
        _check(self.shards not in (None, "", []), "data.shards is required (a pattern, a list or a .txt file)")
        _check(self.stage_ahead >= 1, "data.stage_ahead must be >= 1")
        _check(len(self.image_extensions) > 0, "data.image_extensions must not be empty")
        _check(self.max_pixels > 0, "data.max_pixels must be > 0")


@dataclass(frozen=True)
class OutputSettings:
    dir: str = ""
    overwrite: bool = False
    normalize_embedding: bool = False  # L2-normalise the embedding column
    keep_components: tuple[str, ...] = ()  # sample components copied into string columns, e.g. [txt, json]
    activation: str = "none"  # scores: none | sigmoid | softmax

    def __post_init__(self):
        _check(bool(self.dir), "output.dir is required")
        _check(self.activation in ACTIVATIONS, f"output.activation must be one of {'|'.join(ACTIVATIONS)}")
        taken = {"key", "shard", "label", "status", "error", "topk_index", "topk_prob", "topk_label", "embedding",
                 "scores", "score"}
        clash = [c for c in self.keep_components if c.lower() in taken or not c.isidentifier()]
        _check(not clash, f"output.keep_components cannot name {clash[0]!r}: pick component extensions like txt, json"
               if clash else "")


@dataclass(frozen=True)
class DaliSettings:
    """DALI's reading (windows of shards, mmap) and its GPU (`mixed`) JPEG decoder's options
    (fn.decoders.image; not used on the CPU)."""

    hw_decoder_load: float = 0.9  # share of JPEGs for the hardware decoder (A100/H100), the rest on CUDA
    preallocate_width_hint: int = 0  # the largest image expected, so the hardware decoder allocates once
    preallocate_height_hint: int = 0
    device_memory_padding: int = 16 * 2**20  # per-thread nvJPEG buffers, bytes
    host_memory_padding: int = 8 * 2**20
    jpeg_fancy_upsampling: bool = True  # chroma upsampling as libjpeg's default (what the CPU path does)
    window_rows: int = 65536  # a reader reads consecutive shards until it holds this many samples …
    window_bytes: int = 512 * 2**20  # … or this many bytes of tar: what one reader maps and indexes at once
    mmap: bool = True  # the reader maps shards; false: reads them (DALI advises it on network file systems)
    # Where crops are resized on the CPU: auto = torch (the torch back-end's resize: 3x faster here than DALI's
    # CPU one), or dali (the graph the GPU runs). On CUDA always in DALI, on the device.
    resize: str = "auto"

    def __post_init__(self):
        _check(0 <= self.hw_decoder_load <= 1, "loader.dali.hw_decoder_load must be in [0, 1]")
        _check(self.resize in ("auto", "dali", "torch"), "loader.dali.resize must be auto, dali or torch")
        _check(self.window_rows >= 1 and self.window_bytes >= 1, "loader.dali.window_rows/window_bytes must be >= 1")
        _check(min(self.preallocate_width_hint, self.preallocate_height_hint, self.device_memory_padding,
                   self.host_memory_padding) >= 0, "loader.dali hints and paddings must be >= 0")


@dataclass(frozen=True)
class LoaderSettings:
    """Decoding resources: DALI threads or DataLoader workers, and how many batches to read ahead."""

    threads: int | None = None  # None: the CPUs this process may use (Slurm's --cpus-per-task, else affinity)
    prefetch: int = 2
    dali: DaliSettings = field(default_factory=DaliSettings)

    def __post_init__(self):
        _check(self.threads is None or self.threads >= 0, "loader.threads must be >= 0 or null")
        _check(self.prefetch >= 1, "loader.prefetch must be >= 1")


@dataclass(frozen=True)
class OomSettings:
    regrow_after: int = 50  # successful batches before trying a doubled micro-batch again
    inject_above: int | None = None  # debug: raise a real OutOfMemoryError above this many rows
    inject_limit: int | None = None  # debug: stop injecting after this many injected errors
    inject_decode_above: int | None = None  # debug: DALI decode batches above this many images run out of memory
    inject_model: str | None = None  # debug: inject_above into this model only (a name under models:)

    def __post_init__(self):
        _check(self.regrow_after >= 1, "oom.regrow_after must be >= 1")
        _check(self.inject_above is None or self.inject_above >= 0, "oom.inject_above must be >= 0 or null")


@dataclass(frozen=True)
class AutoBatchSettings:
    max_batch_size: int = 4096
    tolerance: float = 0.03
    repeats: int = 3

    def __post_init__(self):
        _check(self.max_batch_size >= 1, "auto.max_batch_size must be >= 1")
        _check(0 <= self.tolerance < 1, "auto.tolerance must be in [0, 1)")
        _check(self.repeats >= 1, "auto.repeats must be >= 1")


@dataclass(frozen=True)
class EngineSettings:
    """Exported engines (model.backend=onnxruntime|tensorrt): where they are kept, and the gate they pass."""

    cache_dir: str | None = None  # null: $SHARDSCORE_ENGINE_CACHE, else ~/.cache/shardscore/engines
    opset: int = 18  # ONNX opset of the exported graphs
    gate_top1: float = 0.99  # classifiers: the share of rows whose top-1 class matches eager's
    gate_cosine: float = 0.999  # scores and embeddings: the mean cosine of each row with eager's
    calibration_images: int = 512  # precision=int8: the first images of the dataset, calibrated on
    calibration_method: str = "minmax"  # minmax | entropy | percentile (ONNX Runtime's calibrators)

    def __post_init__(self):
        _check(0 < self.gate_top1 <= 1 and 0 < self.gate_cosine <= 1, "engine.gate_top1/gate_cosine must be in (0, 1]")
        _check(self.calibration_images >= 1, "engine.calibration_images must be >= 1")
        _check(self.calibration_method in ("minmax", "entropy", "percentile"),
               "engine.calibration_method must be minmax, entropy or percentile")
        _check(self.opset >= 13, "engine.opset must be >= 13")


@dataclass(frozen=True)
class DistSettings:
    """This process's rank among all ranks of the run; null = read from Slurm's environment."""

    rank: int | None = None
    world_size: int | None = None


@dataclass(frozen=True)
class ScoreSettings:
    """Everything `pipeline.runner.score` needs."""

    data: DataSettings
    output: OutputSettings
    model: ModelSettings = field(default_factory=lambda: ModelSettings(name="resnet18"))
    models: dict[str, ModelSettings] = field(default_factory=dict)  # several named models: `model` is unused
    outputs: tuple[str, ...] = ("topk",)  # output kinds (pipeline/outputs.py); one forward pass feeds them all
    batch_size: int | str = 256  # or "auto"
    precision: str = "auto"
    device: str = "auto"
    decoder: str = "auto"
    seed: int = 0
    progress: bool = True  # a bar on a terminal, else a log line every log_every_s
    log_every_s: float = 60.0  # progress lines and the running metrics file
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    oom: OomSettings = field(default_factory=OomSettings)
    auto: AutoBatchSettings = field(default_factory=AutoBatchSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    dist: DistSettings = field(default_factory=DistSettings)

    def __post_init__(self):
        _check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
               f"batch_size must be a positive integer or auto, got {self.batch_size!r}")
        _check(self.precision in PRECISIONS, f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.device in DEVICES, f"device must be one of {'|'.join(DEVICES)}, got {self.device!r}")
        _check(self.log_every_s > 0, "log_every_s must be > 0")
        _check(self.decoder in DECODERS, f"decoder must be one of {'|'.join(DECODERS)}, got {self.decoder!r}")
        _check(not self.model.is_head, "model.source=head runs on another model's output: give it under models:")
        check_models(self.models)
        backends = {m.engine_backend for _, m in self.named_models if not m.is_head}
        _check(self.precision != "int8" or backends & {"onnxruntime", "tensorrt"},
               "precision=int8 quantises an engine: give model.backend=onnxruntime (or tensorrt on a GPU)")
        _check(self.oom.inject_model is None or self.oom.inject_model in self.models,
               f"oom.inject_model={self.oom.inject_model} is not a model of models:")

    @property
    def named_models(self) -> list[tuple[str | None, ModelSettings]]:
        """The run's models: (None, `model`) in the single-model form (columns unprefixed), else each of
        `models` by its name, heads after the model they read."""
        if not self.models:
            return [(None, self.model)]
        return [(name, self.models[name]) for name in model_order(self.models)]


def check_models(models: dict) -> None:
    """Names that can prefix a column; each head's input exists and is not itself (or a loop)."""
    for name, m in models.items():
        _check(name.isidentifier() and name.islower() and not name.startswith("_"),
               f"models.{name}: a model's name prefixes its columns: use lower-case letters, digits and _")
        if m.is_head:
            _check(m.input_model in models, f"models.{name}.input={m.input}: there is no model "
                   f"{m.input_model!r} (models: {', '.join(models)})")
    model_order(models)


def model_order(models: dict) -> list[str]:
    """Backbones in their given order, then each head once the model it reads is placed."""
    order = [n for n, m in models.items() if not m.is_head]
    heads = [n for n, m in models.items() if m.is_head]
    while heads:
        ready = [n for n in heads if models[n].input_model in order]
        _check(bool(ready), f"models: the heads {', '.join(heads)} read each other in a loop")
        order += ready
        heads = [n for n in heads if n not in ready]
    return order


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def from_mapping(cls, values: typing.Mapping, where: str = ""):
    """Build dataclass `cls` from a nested mapping, converting lists and checking every key and type."""
    if not isinstance(values, typing.Mapping):
        raise UserError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config key {where + unknown[0]!r}; known keys: {', '.join(sorted(names))}")
    kwargs = {name: _convert(hints[name], value, where + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{where or 'config'}: {e}") from None


def _convert(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: bad value {value!r}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, typing.Sequence):
            raise UserError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        converted = [_convert(item, v, where) for v in value]
        return tuple(converted) if origin is tuple else converted
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is dict:
        if not isinstance(value, typing.Mapping):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        converted = {}
        for k, v in value.items():
            try:
                converted[str(k)] = _convert(item, v, f"{where}.{k}")
            except UserError as e:  # a model's own checks name `model.<key>`: say which model
                message = str(e)
                raise UserError(f"{where}.{k}.{message[6:]}" if message.startswith("model.") else message) from None
        return converted
    if hint is dict:
        if not isinstance(value, typing.Mapping):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise UserError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    raise UserError(f"{where}: unsupported type {hint}")
