"""Typed, strict configuration: frozen dataclasses, YAML files, dotted ``--set`` overrides.

Unknown keys, wrong types and impossible values are errors that name the file and the dotted
key (``train.yaml: optim.lr: expected a number, got 'fast'``); nothing is silently dropped.
The same dotted keys are what Ray Tune searches over.

One key follows another: UniBCT's ``compat.refine_epochs`` are clamped to ``optim.epochs``
(``clamp_refine_epochs``; those at or past the last epoch are dropped, and if none is left the
run refines once, after epoch ``max(1, epochs // 2)``), so ``--set optim.epochs=2`` shrinks a
run without a second ``--set``; the command line prints a note saying what was clamped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from unibct_ray.errors import ConfigError

__all__ = [
    "DataSection",
    "ModelSection",
    "HeadSection",
    "OptimSection",
    "CompatSection",
    "TrainConfig",
    "from_dict",
    "clamp_refine_epochs",
    "to_dict",
    "load_config",
    "apply_overrides",
]

METHODS = ("independent", "l2", "bct", "unibct", "nccl", "advbct", "mixbct")
HEADS = ("arcface", "cosface", "softmax")
BACKBONES = ("r18", "r34", "r50", "r100", "tiny", "small")
#: Upper bounds of sizes and counts: far above any real run, far below an allocation that
#: would take a machine down (an embedding of 8,192 floats, a batch of 2^20 images).
MAX_EMBEDDING = 8192
MAX_BATCH = 1 << 20
MAX_PROCESSES = 100_000


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass(frozen=True)
class DataSection:
    train: str = ""               # shard set (a `data convert`/`data split` output directory)
    image_size: int = 112         # crops are resized to this if they differ
    flip: bool = True             # random horizontal flip (the only augmentation, as the paper)
    cache_bytes: int = 2_000_000_000  # shard sets up to this size are read once into the object store
    # Rows shuffled per worker and epoch (shards are in class order): a buffer of decoded
    # images, rows x 3 x size^2 x 4 bytes (4096 at 112 px: ~600 MB per worker); 0 disables.
    shuffle_buffer: int = 4096


@dataclass(frozen=True)
class ModelSection:
    backbone: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0


@dataclass(frozen=True)
class HeadSection:
    type: str = "arcface"
    scale: float = 64.0
    margin: float = 0.5
    # Model-parallel head: each worker holds 1/num_workers of the class centres (none are
    # all-reduced); null = on whenever num_workers > 1, false = every worker holds all of them.
    parallel: bool | None = None
    # Fraction of each worker's centres in one step's softmax (positives always in): 1 = exact.
    sample_rate: float = 1.0


@dataclass(frozen=True)
class OptimSection:
    lr: float = 0.1               # at base_batch; the effective lr is lr * global_batch / base_batch
    base_batch: int = 1024
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 35
    poly_power: float = 2.0       # lr_t = lr * (1 - t / T) ** power, per step
    warmup_epochs: float = 0.0
    clip_grad_norm: float = 5.0   # on the backbone; 0 disables
    nonfinite_steps: int = 3      # consecutive NaN/inf-loss steps skipped before the run stops


@dataclass(frozen=True)
class CompatSection:
    """How the new model is made compatible with the old one (``compat.*``).

    ``method``: independent | l2 | bct | unibct | nccl | advbct | mixbct. Every method but
    independent needs ``old_checkpoint``; the loss is ``head loss + weight * L_comp``. The
    ``nccl_*``, ``advbct_*`` and ``mixbct_*`` keys are read only by their method; their
    defaults are the published settings:

    * nccl: ``L_comp = nccl_alpha * l1 + nccl_beta * l2`` over a FIFO queue of
      ``nccl_queue`` old embeddings/old logits/labels gathered from every rank, softmax
      temperature ``nccl_temperature`` (needs the replicated head: ``head.parallel`` not true).
    * advbct: ``L_comp = advbct_p2s_weight * L_p2s + advbct_adv_weight * (E - e + 1) / E *
      L_adv``; elastic radii around each class's inlier radius, pivot ``advbct_threshold``;
      a discriminator with ``advbct_hidden`` hidden units.
    * mixbct: no ``L_comp`` (``weight`` is unused): in each local batch
      ``round(mixbct_ratio * b)`` credible samples (the ``ceil(mixbct_credible * n_c)``
      closest to their class's old-feature centre) feed their normalised old feature to the
      head instead of the new embedding.
    """

    method: str = "independent"   # independent | l2 | bct | unibct | nccl | advbct | mixbct
    weight: float = 1.0           # w in head loss + w * L_comp (independent, mixbct: 0 whatever this says)
    old_checkpoint: str = ""      # required by every method but independent
    l2_margin: float = 0.0        # 0.2 = the "weakened" l2 variant
    scale: float = 30.0           # s of the prototype classifier (bct/unibct)
    margin: float = 0.0           # additive angular margin on the prototype target
    # unibct: refine the prototypes after these epochs (each in 1..optim.epochs-1). A shorter
    # run clamps them (``clamp_refine_epochs``, with a note): those >= optim.epochs are dropped,
    # and when none is left the run refines once, after epoch max(1, optim.epochs // 2).
    refine_epochs: tuple[int, ...] = (10, 20)
    refine: bool = True           # False: plain class means of old features (no refinement)
    lam: float = 0.9
    temperature: float = 0.05
    axis: str = "row"             # row (ours) | column (public re-implementation)
    # Directory where old-model features of a training set are kept and shared between runs
    # (keyed by the old checkpoint's and the shard manifest's hashes); "" = inside the run.
    old_features_cache: str = ""
    # NCCL (Wu et al., AAAI 2022)
    nccl_alpha: float = 1.0       # weight of the feature-consensus term l1
    nccl_beta: float = 0.01       # weight of the logit-consensus term l2
    nccl_queue: int = 8192        # queue entries (old embedding, old logits, label), all ranks together
    nccl_temperature: float = 1.0
    # AdvBCT (Pan et al., CVPR 2023)
    advbct_threshold: float = 0.4  # radius pivot of the elastic boundary
    advbct_p2s_weight: float = 4.0
    advbct_adv_weight: float = 4.0  # times (E - e + 1) / E in epoch e of E
    advbct_hidden: int = 100      # discriminator Linear(d, h) -> BN -> ReLU -> Linear(h, 2)
    # MixBCT (Liang et al., 2023)
    mixbct_ratio: float = 0.3     # fraction of each local batch fed old features
    mixbct_credible: float = 0.9  # T: fraction of each class that is credible


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    head: HeadSection = field(default_factory=HeadSection)
    optim: OptimSection = field(default_factory=OptimSection)
    compat: CompatSection = field(default_factory=CompatSection)
    global_batch: int = 1024
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    amp: bool = True              # autocast on GPU (amp_dtype); CPU runs in float32
    amp_dtype: str = "fp16"       # fp16 (with a gradient scaler) | bf16 (no scaler needed)
    channels_last: bool = False   # NHWC memory format for the backbone and its input (GPU)
    seed: int = 0
    storage: str = "runs"         # run directories go to STORAGE/NAME
    max_failures: int = 2         # worker failures survived (restart from the last checkpoint)
    extract_actors: int = 2       # actor pool size for feature extraction
    refine_actors: int = 2        # actors sharing the per-class refinement
    # Inference (old features, refinement features) and refinement placement. With use_gpu, each
    # extraction/refinement actor takes a fractional GPU share and every train worker takes
    # 1 - extract_gpus of its GPU, so an actor fits beside a worker on the same device.
    extract_gpus: float = 0.25    # GPU share of an extraction / refinement actor (use_gpu only)
    extract_cpus: float = 1.0     # CPUs of an extraction actor (it decodes its own batches; on CPU one torch thread per whole CPU)
    extract_batch: int = 256      # images per forward pass of an extraction actor
    decode_cpus: float = 1.0      # CPUs of each Ray Data read/decode task feeding the workers

    def validate(self, where: str = "config") -> "TrainConfig":
        """Every key in range, checked before anything is allocated or started.

        Counts are bounded by what a machine can hold (a typo such as ``embedding_size:
        1000000000000`` must not reach an allocation) and every rate is finite (YAML reads
        ``1e999`` as inf).
        """
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {key}: {msg}")

        def number(key: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
            v = _get(self, key)
            ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            need(ok, key, f"must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v!r}")

        def count(key: str, lo: int, hi: int) -> None:
            v = _get(self, key)
            need(lo <= v <= hi, key, f"must be an integer in {lo}..{hi}, got {v}")

        need(self.model.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}, got {self.model.backbone!r}")
        count("model.embedding_size", 1, MAX_EMBEDDING)
        number("model.dropout", 0, 1, hi_open=True)
        need(self.head.type in HEADS, "head.type", f"must be one of {HEADS}, got {self.head.type!r}")
        number("head.scale", 0, 1e4, lo_open=True)
        number("head.margin", 0, math.pi / 2, hi_open=True)
        number("head.sample_rate", 0, 1, lo_open=True)
        need(self.amp_dtype in ("fp16", "bf16"), "amp_dtype", f"must be fp16 or bf16, got {self.amp_dtype!r}")
        number("optim.lr", 0, 1e3, lo_open=True)
        count("optim.epochs", 1, 100_000)
        count("optim.base_batch", 1, MAX_BATCH)
        number("optim.momentum", 0, 1, hi_open=True)
        number("optim.weight_decay", 0, 1, hi_open=True)
        number("optim.poly_power", 0, 100)
        number("optim.warmup_epochs", 0, self.optim.epochs)
        number("optim.clip_grad_norm", 0, 1e9)
        count("optim.nonfinite_steps", 0, 1000)
        count("global_batch", 1, MAX_BATCH)
        count("num_workers", 1, MAX_PROCESSES)
        need(self.global_batch % self.num_workers == 0, "global_batch",
             f"{self.global_batch} is not divisible by num_workers={self.num_workers}")
        number("cpus_per_worker", 0, 1024, lo_open=True)
        number("extract_gpus", 0, 0.5, lo_open=True, hi_open=True)  # > 0.5 per worker: one worker per GPU
        number("extract_cpus", 0, 1024, lo_open=True)
        count("extract_batch", 1, MAX_BATCH)
        number("decode_cpus", 0, 1024, lo_open=True)
        count("extract_actors", 1, MAX_PROCESSES)
        count("refine_actors", 1, MAX_PROCESSES)
        count("max_failures", 0, 1000)
        count("seed", 0, 2**63 - 1)
        need(16 <= self.data.image_size <= 224 and self.data.image_size % 16 == 0, "data.image_size",
             f"must be a multiple of 16 in 16..224, got {self.data.image_size}")
        count("data.shuffle_buffer", 0, 1_000_000)
        count("data.cache_bytes", 0, 2**50)
        need(self.compat.method in METHODS, "compat.method", f"must be one of {METHODS}, got {self.compat.method!r}")
        number("compat.weight", 0, 1e6)
        number("compat.l2_margin", 0, 2)
        number("compat.scale", 0, 1e4, lo_open=True)
        number("compat.margin", 0, math.pi / 2, hi_open=True)
        need(self.compat.axis in ("row", "column"), "compat.axis", "must be 'row' or 'column'")
        number("compat.lam", 0, 1, lo_open=True, hi_open=True)
        number("compat.temperature", 0, 1e3, lo_open=True)
        number("compat.nccl_alpha", 0, 1e6)
        number("compat.nccl_beta", 0, 1e6)
        count("compat.nccl_queue", 1, MAX_BATCH)
        number("compat.nccl_temperature", 0, 1e3, lo_open=True)
        number("compat.advbct_threshold", 0, 2)
        number("compat.advbct_p2s_weight", 0, 1e6)
        number("compat.advbct_adv_weight", 0, 1e6)
        count("compat.advbct_hidden", 1, MAX_EMBEDDING)
        number("compat.mixbct_ratio", 0, 1)
        number("compat.mixbct_credible", 0, 1, lo_open=True)
        if self.compat.method == "nccl":
            # the queue always holds the current global batch (it is updated before the loss)
            need(self.compat.nccl_queue >= self.global_batch, "compat.nccl_queue",
                 f"must hold at least one global batch ({self.global_batch}), got {self.compat.nccl_queue}")
            # l2 compares all C logits of a sample with all C logits of each queue entry
            need(self.head.parallel is not True, "head.parallel",
                 "compat.method nccl needs every class's logit on every rank: leave head.parallel "
                 "null (replicated with nccl) or set it false")
        if self.compat.method == "unibct":
            need(self.optim.epochs >= 2, "optim.epochs", f"method 'unibct' needs at least 2 epochs (a refinement "
                 f"after one epoch, then training on its prototypes), got {self.optim.epochs}")
            need(bool(self.compat.refine_epochs), "compat.refine_epochs", "method 'unibct' needs at least one epoch")
            need(all(0 < e < self.optim.epochs for e in self.compat.refine_epochs), "compat.refine_epochs",
                 f"every epoch must be in 1..{self.optim.epochs - 1} (refinement needs a trained new model)")
        if self.compat.method != "independent":
            need(bool(self.compat.old_checkpoint), "compat.old_checkpoint",
                 f"required for method {self.compat.method!r}")
        return self

    @property
    def head_parallel(self) -> bool:
        """Whether the workers shard the class centres (``head.parallel``, default: several
        workers, except with nccl, whose logit term needs every class's logit on every rank)."""
        if self.head.parallel is None:
            return self.num_workers > 1 and self.compat.method != "nccl"
        return bool(self.head.parallel)

    @property
    def per_worker_batch(self) -> int:
        return self.global_batch // self.num_workers

    @property
    def effective_lr(self) -> float:
        """Linear scaling: ``lr * global_batch / base_batch``."""
        return self.optim.lr * self.global_batch / self.optim.base_batch


# ------------------------------------------------------------------ strict (de)serialisation
def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return _from_mapping(tp, value, f"{key}.", where)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return tuple(_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")


def _from_mapping(cls: type, data: Mapping[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: {prefix}{unknown[0]}: unknown key (valid here: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", where) for k, v in data.items()}
    return cls(**kwargs)


def clamp_refine_epochs(refine_epochs: Sequence[int], epochs: int) -> tuple[int, ...]:
    """The UniBCT refinement epochs a run of ``epochs`` epochs holds: those ``>= epochs`` are
    dropped (a refinement must come before the last epoch), and when that drops every one
    the run refines once, after epoch ``max(1, epochs // 2)``. The others are kept as given.

    Shrinking a run (``--set optim.epochs=2``) so needs no hand-made ``refine_epochs``:
    (10, 20) stays (10, 20) at 35 epochs and becomes (10,) at 15, (4,) at 8, (1,) at 2.
    """
    kept = tuple(e for e in refine_epochs if e < epochs)
    if kept or not refine_epochs:
        return kept
    return (max(1, epochs // 2),)


def _fit_refine_epochs(cfg: TrainConfig, where: str, note: Callable[[str], None] | None) -> TrainConfig:
    """``cfg`` with ``clamp_refine_epochs`` applied (unibct only: no other method refines)."""
    if cfg.compat.method != "unibct" or cfg.optim.epochs < 2:  # under 2 epochs: validation says why
        return cfg
    old = cfg.compat.refine_epochs
    new = clamp_refine_epochs(old, cfg.optim.epochs)
    if new == old:
        return cfg
    if note is not None:
        note(f"{where}: compat.refine_epochs {list(old)} -> {list(new)} (optim.epochs is {cfg.optim.epochs}; "
             "a refinement must come before the last epoch)")
    return dataclasses.replace(cfg, compat=dataclasses.replace(cfg.compat, refine_epochs=new))


def from_dict(data: Mapping[str, Any], where: str = "config", *,
              note: Callable[[str], None] | None = None) -> TrainConfig:
    """Build and validate a ``TrainConfig`` from plain data (unknown keys are errors).

    UniBCT refinement epochs beyond the run are clamped (``clamp_refine_epochs``);
    ``note`` gets one line saying so."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return _fit_refine_epochs(_from_mapping(TrainConfig, data, "", where), where, note).validate(where)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable data (tuples become lists)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-3`` is a number (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers; every config, tune file and ``--set`` uses it."""
    return yaml.load(text, Loader=_Loader)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping is a
    ``ConfigError`` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        data = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p.name}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: Sequence[str], where: str = "--set") -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars/lists) to a copy of ``data``."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}: {item!r}: expected KEY=VALUE, e.g. optim.lr=0.05")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: {key}: cannot parse value {raw!r} ({e})") from None
        _set_dotted(out, key.strip(), value, where)
    return out


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                note: Callable[[str], None] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, and validate strictly (``note``: as in
    ``from_dict``)."""
    p = Path(path)
    data = read_yaml_mapping(p)
    where = p.name if not overrides else f"{p.name} (with --set)"
    return from_dict(apply_overrides(data, overrides), where, note=note)
