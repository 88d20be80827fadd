"""The run's models: one in the single-model form (`model`, columns unprefixed), or several named ones
(`models`), all fed from one decode.

Each backbone reads the decoder's view for its preprocessing ("branch": models with the same
preprocessing share one); each head reads another model's output on the device, right after it. Each
model has its own Scorer (micro-batch, OOM halving), so one model running out of memory never costs
another its rows. Only the models a run needs are run: a model already written in every shard to do is
skipped, unless a head needs its output.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pipeline.decode.assemble import Preprocess
from pipeline.errors import UserError
from pipeline.model import LoadedModel, compile_model, load_model
from pipeline.outputs import OutputOptions, check_names, compute_all, make_outputs
from pipeline.scorer import Scorer
from pipeline.settings import ModelSettings, ScoreSettings
from pipeline.sources import Builder, as_outputs

log = logging.getLogger(__name__)

INPUT_OUTPUT = {"embedding": "embedding", "scores": "output"}  # a head's `input: <model>.<key>` → the output it reads


@dataclass
class PlannedModel:
    """One model of the run, loaded, with its output columns and its part of the run's identity."""

    name: str | None  # None: the single-model form
    settings: ModelSettings
    loaded: LoadedModel
    outputs: list  # output kinds (prefixed with the name when there is one)
    branch: int | None  # index of its preprocessing among the run's; None: a head
    probe: dict  # its outputs for one blank input: their shapes size the columns and any head on it
    input_shape: tuple = ()  # one row of its input: (3, S, S), or a head's (features,)
    engine: object | None = None  # its pipeline.engines.Engine, when model.backend is one
    precision: str | None = None  # where it differs from the run's: an eager model in an int8 run

    @property
    def label(self) -> str:
        return self.name or self.settings.label



def model_identities(models: list[PlannedModel], precision: str) -> dict:
    """What makes each model's columns interchangeable between two runs, by name: its source, weights,
    precision, outputs and preprocessing; a head's "preprocessing" is its input and that model's identity."""
    identities: dict = {}
    for m in models:
        pre = m.loaded.preprocess
        read = {"input": m.settings.input, "normalized": m.settings.normalize_input,
                "layers": m.settings.layers, "hidden_activation": m.settings.hidden_activation,
                "module": m.settings.module, "of": identities.get(m.settings.input_model)} \
            if pre is None else dataclasses.asdict(pre)
        identities[m.name] = {"model": m.settings.label, "source": m.settings.source_label,
                              "weights": m.loaded.source, "precision": m.precision or precision,
                              "outputs": [kind.identity for kind in m.outputs], "preprocess": read}
    return identities


def load_models(settings: ScoreSettings, device: torch.device, dtype: torch.dtype,
                build: Builder | None = None) -> list[PlannedModel]:
    """Every model of the run, in the order they run (heads after what they read); user errors here."""
    out = settings.output
    planned: dict[str, PlannedModel] = {}
    preprocesses: list[Preprocess] = []
    for name, m in settings.named_models:
        kinds = m.outputs or (("scores",) if m.is_head else settings.outputs)
        check_names(kinds)
        source = planned.get(m.input_model) if m.is_head else None
        head_input = _head_input(source, m, device, dtype) if source else None
        read = any(h.is_head and h.input == f"{name}.embedding" for _, h in settings.named_models)  # by a head
        loaded = load_model(m, device, dtype, settings.seed, "embedding" in kinds or read, build,
                            in_features=head_input.shape[1] if head_input is not None else None)
        if source is None:
            probe = probe_outputs(loaded.module, loaded.preprocess.crop_size, device, dtype)
            if loaded.preprocess not in preprocesses:
                preprocesses.append(loaded.preprocess)
            branch = preprocesses.index(loaded.preprocess)
            shape = (3, loaded.preprocess.crop_size, loaded.preprocess.crop_size)
        else:
            probe, branch = _run_probe(loaded.module, head_input, name), None
            shape = tuple(head_input.shape[1:])
        options = OutputOptions(probe, m.topk, loaded.categories, loaded.classifier,
                                out.normalize_embedding if m.normalize_embedding is None else m.normalize_embedding,
                                out.activation if m.activation is None else m.activation)
        try:
            kinds = make_outputs(kinds, options, name)
        except UserError as e:
            raise UserError(f"models.{name}: {e}" if name else str(e)) from None
        planned[name] = PlannedModel(name, m, loaded, kinds, branch, probe, shape)
    return list(planned.values())


def preprocessings(models: list[PlannedModel]) -> list[Preprocess]:
    """The decoder's branches: each distinct preprocessing once, in the order of the models' `branch`."""
    found: list[Preprocess] = []
    for m in models:
        if m.branch is not None and m.branch == len(found):
            found.append(m.loaded.preprocess)
    return found


class ModelSet:
    """`forward(views, n_valid)`: the output values of every model a run writes, for one batch, on the device.
    `branches`: the preprocessings (indices into the run's) the decoder is to make views of, in order."""

    def __init__(self, models: list[PlannedModel], batch_size: int, device: torch.device, dtype: torch.dtype,
                 precision: str, oom, inject_into: str | None = None):
        self.models = models
        self.dtype = dtype
        self.scorers: dict[str | None, Scorer] = {}
        for m in models:
            if m.settings.engine_backend == "compile":
                m.loaded.module = compile_model(m.loaded.module)
            pre = m.loaded.preprocess
            context = (f"model={m.label} precision={precision} "
                       + (f"image_size={pre.crop_size}" if pre else f"input={m.settings.input}"))
            injected = oom if inject_into in (None, m.name) else dataclasses.replace(oom, inject_above=None)
            self.scorers[m.name] = Scorer(m.engine or m.loaded.module, batch_size, device, injected, context,
                                          micro_batch=m.settings.batch_size)
        self.run_only({m.name for m in models})

    def run_only(self, write: set) -> None:
        """Write only the models named in `write` (None: the single model), running what they need."""
        self.writing = [m for m in self.models if m.name in write]
        needed = set(write)
        for m in reversed(self.models):  # heads come after their input: one pass backwards finds the chain
            if m.name in needed and m.settings.is_head:
                needed.add(m.settings.input_model)
        self.running = [m for m in self.models if m.name in needed]
        self.branches = sorted({m.branch for m in self.running if m.branch is not None})
        self._view = {branch: i for i, branch in enumerate(self.branches)}

    @property
    def outputs(self) -> list:
        """The output kinds of the models written, in column order."""
        return [kind for m in self.writing for kind in m.outputs]

    def forward(self, views: tuple[torch.Tensor, ...], n_valid: int) -> dict[str, torch.Tensor]:
        results: dict[str | None, dict[str, torch.Tensor]] = {}
        for m in self.running:
            if m.branch is not None:
                x = views[self._view[m.branch]]
            else:
                x = head_input(results[m.settings.input_model], m.settings, self.dtype)
            scorer = self.scorers[m.name]
            if m.engine is not None and m.engine.pending_gate and n_valid > 0:  # the first real rows
                size = scorer.policy.next_size()
                m.engine.gate(x[:size], min(n_valid, size))
            results[m.name] = scorer.forward(x)  # every row, padding too: heads keep one shape
        values: dict[str, torch.Tensor] = {}
        for m in self.writing:
            values.update(compute_all(m.outputs, {k: v[:n_valid] for k, v in results[m.name].items()}))
        return values

    @property
    def oom_events(self) -> int:
        return sum(s.policy.events for s in self.scorers.values())

    @property
    def micro_batch(self) -> int:
        return min(self.scorers[m.name].micro_batch for m in self.running)

    def stats(self) -> dict:
        """Per model run: its micro-batch now and at its smallest, and its OOM events."""
        return {m.label: {"micro_batch": s.micro_batch, "min_micro_batch": s.policy.min_size,
                          "oom_events": s.policy.events, "written": m in self.writing,
                          "backend": m.settings.engine_backend,
                          **({"engine": m.engine.stats()} if m.engine is not None else {})}
                for m in self.running for s in (self.scorers[m.name],)}


def head_input(outputs: dict[str, torch.Tensor], m: ModelSettings, dtype: torch.dtype) -> torch.Tensor:
    """What a head reads of its input model's outputs: [rows, features], L2-normalised if asked for."""
    x = outputs[INPUT_OUTPUT[m.input.split(".")[1]]].flatten(1)
    if m.normalize_input:
        x = F.normalize(x.float(), dim=1).to(dtype)
    return x


def _head_input(source: PlannedModel, m: ModelSettings, device, dtype) -> torch.Tensor:
    return head_input({k: v.to(device) for k, v in source.probe.items()}, m, dtype)


def _run_probe(module, x: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    try:
        with torch.inference_mode():
            out = module(x)
    except RuntimeError as e:  # the layers or the module do not take this input
        raise UserError(f"models.{name} cannot read an input of shape {list(x.shape)}: "
                        f"{' '.join(str(e).split())[:160]}") from None
    return as_outputs(out)


def probe_outputs(module, size: int, device, dtype) -> dict[str, torch.Tensor]:
    """The model's outputs for one blank image: their shapes size the output columns."""
    with torch.inference_mode():
        x = torch.zeros((1, 3, size, size), device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = module(x)
    return as_outputs(out)
