"""The resource plan of a run, worked out before anything starts (Ray-free).

A Ray job whose requests cannot all be granted at once does not fail: it waits. A placement
group of training workers that takes every CPU leaves Ray Data's decode tasks pending, and
``fit()`` sits there without an error or a step. This module places, node by node, what a run
holds *at the same time* in each of its phases and refuses a run that cannot start, with one
line naming the shortfall and the config keys that fix it.

Every request comes from :mod:`unibct_ray.resources`, the functions the run itself uses:

* ``old features``   the extraction actors, which read and write their pieces themselves
                     (before training; l2/bct/unibct)
* ``training``       the train workers (one placement group, PACK, as Ray Train's
                     ``ScalingConfig`` default) + at least one Ray Data decode task beside them
* ``refine: extract`` at a UniBCT refinement epoch: the extraction actors;
                     inside a running loop (``train_group``) beside the held workers
* ``refine: solve``   the refinement actors (one SPREAD placement group, all or nothing)

Placement follows Ray's rules: CPUs are a pool per node; a fractional GPU request fits on one
device (a 0.75 and a 0.25 share one GPU, two 0.75 do not); a whole-GPU request takes free
devices. A Tune sweep runs ``max_concurrent`` trials at once: each trial's training holds its
workers while another trial refines.

Memory: :func:`train_worker_memory` and :func:`extract_actor_memory` estimate the resident
bytes of one train worker and one extraction actor from the config (validated against measured
processes by ``unibct-ray bench plan``). They are printed, and a node whose processes add up to
more than its memory gives a warning, not a refusal.

Why one file of ~650 lines: every phase is placed on one simulated cluster state (node by node,
GPU device by device) with Ray's rules; split up, each phase would re-derive that state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from unibct_ray.errors import UserError
from unibct_ray.resources import (decode_task_resources, extract_actor_resources, refine_actor_resources,
                                  train_worker_resources)

if TYPE_CHECKING:
    from unibct_ray.config import TrainConfig

__all__ = ["NodeShape", "parse_nodes", "Placement", "PhasePlan", "MemoryEstimate", "ResourcePlan", "node_shapes", "plan_run",
           "check_plan", "backbone_parameters", "activation_elements", "train_worker_memory",
           "extract_actor_memory", "in_loop_extract_cpus", "decode_cpus_wanted", "DECODE_CPUS_PER_GPU_112",
           "PROCESS_BASELINE_BYTES", "BACKWARD_PEAK_FACTOR", "HEAP_KEPT_FACTOR", "TUNE_TRIAL_CPU"]

#: Rule of thumb for feeding a GPU: one CPU decodes, normalises and flips ~1,500-2,500 112 px
#: JPEGs/s (a full decode alone is ~370 us here), an r50 step at 112 px with fp16 consumes
#: ~2,000-3,000 images/s on a current data-centre GPU: two decode CPUs per GPU, scaled with the
#: pixel count (image_size / 112)^2.
DECODE_CPUS_PER_GPU_112 = 2.0

#: Resident bytes of a Ray worker process that has imported torch, Ray Train, Ray Data and the
#: project and run a tiny backward pass, before any real model or batch (measured here: an idle
#: actor's RSS, 403 MB; its USS 238 MB, the rest shared libraries).
PROCESS_BASELINE_BYTES = 400 << 20

#: Peak of the backward pass over the activations autograd keeps: the gradient maps flowing
#: back and what the allocator holds on to. Measured here (r18, 112 px, batch 16, CPU, one
#: thread): kept activations 704 MB (the count of :func:`activation_elements` exactly), peak
#: resident growth over the model state 1,163 MB.
BACKWARD_PEAK_FACTOR = 1.65

#: What a CPU inference actor's heap holds over one forward pass's live activations. The actor
#: keeps freed blocks in its heap (``unibct_ray.heap``: 1.4-1.5x faster forward passes), and
#: the freed maps of earlier layers and batches do not all coalesce. Measured here (``bench
#: plan``: r18, 112 px, one actor, four full batches of 64): peak RSS 2.39 GB, of which 1.87 GB
#: over the weights, batch and baseline, against 0.73 GB (1.19x the three maps) with glibc's
#: default (``MALLOC_MMAP_THRESHOLD_`` set). On a GPU the activations are on the device.
HEAP_KEPT_FACTOR = 3.0

#: Host bytes a CUDA context adds to a process (driver, cuDNN/cuBLAS handles; typical, not measured here).
CUDA_CONTEXT_BYTES = 600 << 20

#: CPU of a Tune trial's driver (``unibct_ray.distributed.tune.TRIAL_CPU``).
TUNE_TRIAL_CPU = 0.01

_EPS = 1e-9


# ------------------------------------------------------------------ memory model
def _spec(name: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    # Imported here: iresnet imports torch, and the plan itself needs only the table.
    from unibct_ray.models.iresnet import BACKBONE_SPECS

    s = BACKBONE_SPECS[name]
    return s.stem_width, tuple(s.widths), tuple(s.layers)


def _blocks(name: str, image_size: int):
    """(cin, cout, h_in, h_out) of every IBasicBlock, in order."""
    w0, widths, layers = _spec(name)
    h, cin = image_size, w0
    for width, n in zip(widths, layers):
        for i in range(n):
            h_out = (h + 1) // 2 if i == 0 else h
            yield cin, width, h, h_out
            cin, h = width, h_out


def backbone_parameters(name: str, embedding_size: int, image_size: int) -> int:
    """Parameter count of ``build_backbone(name, embedding_size, image_size)``, counted from the
    architecture (conv weights, BN affine pairs, PReLU slopes, the fc layer)."""
    w0, widths, _ = _spec(name)
    n = 3 * w0 * 9 + 2 * w0 + w0  # stem conv, BN, PReLU
    for cin, cout, h_in, h_out in _blocks(name, image_size):
        n += 2 * cin + cin * cout * 9 + 2 * cout + cout + cout * cout * 9 + 2 * cout
        if h_out != h_in or cin != cout:
            n += cin * cout + 2 * cout  # 1x1 downsample conv + BN
    side = image_size
    for _ in range(4):
        side = (side + 1) // 2
    c4 = widths[-1]
    n += 2 * c4 + c4 * side * side * embedding_size + embedding_size + 2 * embedding_size
    return n


def activation_elements(name: str, embedding_size: int, image_size: int) -> tuple[int, int]:
    """Per image: (elements autograd keeps for the backward pass, largest feature map).

    Every op keeps its input: BN, conv and PReLU inputs of each block (the block input, the
    BN1 output, conv1 and BN2 outputs at the input resolution, the conv2 and downsample
    outputs at the output resolution), the stem's maps, and the head's."""
    w0, widths, _ = _spec(name)
    s2 = image_size * image_size
    kept = 3 * s2 + 2 * w0 * s2  # stem: image (conv in), conv out (BN in), BN out (PReLU in)
    largest = w0 * s2
    for cin, cout, h_in, h_out in _blocks(name, image_size):
        a, b = h_in * h_in, h_out * h_out
        kept += 2 * cin * a + 3 * cout * a + cout * b
        if h_out != h_in or cin != cout:
            kept += cout * b
        largest = max(largest, cin * a, cout * a)
    side = image_size
    for _ in range(4):
        side = (side + 1) // 2
    kept += 2 * widths[-1] * side * side + embedding_size  # BN2d in and out (the fc input), BN1d in
    return kept, largest


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated resident bytes of one process, by part (``host``: RAM; ``device``: GPU memory)."""

    what: str
    parts: dict[str, int]
    device_parts: dict[str, int] = field(default_factory=dict)

    @property
    def host(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def device(self) -> int:
        return int(sum(self.device_parts.values()))


def train_worker_memory(cfg: "TrainConfig", num_classes: int | None = None) -> MemoryEstimate:
    """One Ray Train worker, at its peak (the backward pass of a step).

    * model state: P parameters x 4 bytes x (weights + grads + momentum [+ DDP's gradient
      buckets with more than one worker]); P from :func:`backbone_parameters`
    * head: the replicated class centres, C x d x 4 x 3 (weights + grads + momentum)
    * activations: kept elements per image x 4 bytes (2 with fp16 autocast on GPU) x per-worker
      batch x :data:`BACKWARD_PEAK_FACTOR` (the backward pass's gradient maps)
    * logits: per-worker batch x C x 4 x 6 (cosines, margins, softmax and their gradients)
    * batches: the decoded batch, Ray Data's prefetched one and its torch copy, 3 x b x 3 x S^2 x 4
    * shuffle buffer: ``data.shuffle_buffer`` x 3 x S^2 x 4 decoded rows (on the host)
    * baseline: the process with torch and Ray imported (+ a CUDA context with ``use_gpu``)
    * nccl: its queue, Q x (d + C) x 4 (old embeddings and old logits), and the per-step
      scores against it, b x Q x 4 x 6
    With ``use_gpu`` the model, head, activations, logits and the nccl queue are device memory.
    """
    b, s, d = cfg.per_worker_batch, cfg.data.image_size, cfg.model.embedding_size
    p = backbone_parameters(cfg.model.backbone, d, s)
    kept, _ = activation_elements(cfg.model.backbone, d, s)
    act_bytes = 2 if (cfg.use_gpu and cfg.amp) else 4
    c = int(num_classes or 0)
    copies = 3 + (1 if cfg.num_workers > 1 else 0)
    heavy = {
        "model state": p * 4 * copies,
        "head": c * d * 4 * 3,
        "activations": int(b * kept * act_bytes * BACKWARD_PEAK_FACTOR),
        "logits": b * c * 4 * 6,
    }
    if cfg.compat.method == "nccl":
        q = cfg.compat.nccl_queue
        heavy["nccl queue"] = q * (d + c) * 4 + b * q * 4 * 6
    host = {
        "batches": 3 * b * 3 * s * s * 4,
        "shuffle buffer": cfg.data.shuffle_buffer * 3 * s * s * 4,
        "baseline": PROCESS_BASELINE_BYTES + (CUDA_CONTEXT_BYTES if cfg.use_gpu else 0),
    }
    if cfg.use_gpu:
        return MemoryEstimate("train worker", host, heavy)
    return MemoryEstimate("train worker", {**heavy, **host})


def extract_actor_memory(cfg: "TrainConfig", backbone: str | None = None) -> MemoryEstimate:
    """One feature-extraction actor: weights (P x 4), one batch of inference activations (the
    three largest maps alive at once: a block's input, its BN and conv outputs; on the CPU
    times :data:`HEAP_KEPT_FACTOR`, the freed maps the actor's heap keeps), the decoded batch
    (``extract_batch`` x 3 x S^2 x 4) and the process baseline. ``backbone``: the old model's,
    for the old-feature pass (default: the config's)."""
    name = backbone or cfg.model.backbone
    b, s, d = cfg.extract_batch, cfg.data.image_size, cfg.model.embedding_size
    p = backbone_parameters(name, d, s)
    _, largest = activation_elements(name, d, s)
    live = b * 3 * largest * 4
    heavy = {"weights": p * 4, "activations": live if cfg.use_gpu else int(live * HEAP_KEPT_FACTOR)}
    host = {"decoded batch": b * 3 * s * s * 4,
            "baseline": PROCESS_BASELINE_BYTES + (CUDA_CONTEXT_BYTES if cfg.use_gpu else 0)}
    if cfg.use_gpu:
        return MemoryEstimate("extraction actor", host, heavy)
    return MemoryEstimate("extraction actor", {**heavy, **host})


# ------------------------------------------------------------------ nodes and placement
@dataclass(frozen=True)
class NodeShape:
    """One node as Ray sees it: logical CPUs and GPUs, memory and object store in bytes (0: unknown)."""

    name: str
    cpu: float
    gpu: float = 0.0
    memory: float = 0.0
    object_store_memory: float = 0.0
    head: bool = False


def parse_nodes(text: str, where: str = "--plan-nodes") -> list[NodeShape]:
    """``"0,32:4x2"`` -> a head with 0 CPUs, then 2 nodes of 32 CPUs and 4 GPUs.

    Comma-separated ``CPU[:GPU][xCOUNT]`` entries; the first is the head."""
    out: list[NodeShape] = []
    for i, item in enumerate(t.strip() for t in text.split(",")):
        body, _, count = item.partition("x")
        cpu, _, gpu = body.partition(":")
        try:
            c, g, k = float(cpu), float(gpu or 0), int(count or 1)
        except ValueError:
            raise UserError(f"{where}: {item!r}: expected CPU[:GPU][xCOUNT], e.g. 0,32:4x2 (a 0-CPU head and "
                            "two nodes of 32 CPUs and 4 GPUs)") from None
        if c < 0 or g < 0 or k < 1:
            raise UserError(f"{where}: {item!r}: CPUs and GPUs must be >= 0 and COUNT >= 1")
        for j in range(k):
            out.append(NodeShape("head" if i == 0 else f"node-{len(out)}", c, g, head=i == 0))
    return out


def node_shapes(nodes: Sequence[Mapping[str, Any]]) -> list[NodeShape]:
    """Resource dicts (``{"CPU", "GPU", "memory", "object_store_memory"}``, as Ray's node
    ``Resources``; optional ``name`` and ``head``, or Ray's ``node:__internal_head__``) -> shapes."""
    out = []
    for i, n in enumerate(nodes):
        head = bool(n.get("head", False)) or "node:__internal_head__" in n
        name = str(n.get("name") or ("head" if head else f"node-{i}"))
        out.append(NodeShape(name, float(n.get("CPU", 0.0)), float(n.get("GPU", 0.0)), float(n.get("memory", 0.0)),
                             float(n.get("object_store_memory", 0.0)), head))
    return out


@dataclass(frozen=True)
class Placement:
    """``count`` copies of one request placed on ``node`` (GPU shares on ``devices``)."""

    what: str
    node: str
    count: int
    cpu: float
    gpu: float
    memory: int = 0
    device_memory: int = 0
    devices: tuple[int, ...] = ()


@dataclass(frozen=True)
class PhasePlan:
    """What one phase holds at once, where; ``left``: per node (CPU, GPU) free after it;
    ``shortfall``: the one-line reason it cannot run (None: it can)."""

    name: str
    placements: tuple[Placement, ...]
    left: dict[str, tuple[float, float]]
    shortfall: str | None = None


@dataclass(frozen=True)
class ResourcePlan:
    """The phases of a run (or of ``trials`` concurrent Tune trials) on one set of nodes."""

    config: str
    nodes: tuple[NodeShape, ...]
    phases: tuple[PhasePlan, ...]
    warnings: tuple[str, ...]
    memory: tuple[MemoryEstimate, ...]
    trials: int = 1

    @property
    def ok(self) -> bool:
        return all(p.shortfall is None for p in self.phases)

    @property
    def shortfall(self) -> str | None:
        return next((p.shortfall for p in self.phases if p.shortfall), None)

    def table(self) -> str:
        """A readable table: phase, what, where, CPU, GPU, memory estimate per process."""
        rows = [("phase", "what", "where", "CPU", "GPU", "memory (each)")]
        for ph in self.phases:
            for pl in ph.placements:
                gpu = f"{pl.gpu:g}" + (f" (GPU {','.join(map(str, pl.devices))})" if pl.devices else "")
                mem = _gib(pl.memory) if pl.memory else "-"
                if pl.device_memory:
                    mem += f" + {_gib(pl.device_memory)} GPU"
                rows.append((ph.name, f"{pl.count} x {pl.what}", pl.node, f"{pl.cpu:g}", gpu, mem))
            left = ", ".join(f"{n} {c:g} CPU" + (f" {g:g} GPU" if g > _EPS else "") for n, (c, g) in ph.left.items())
            rows.append((ph.name, "left", "", "", "", left))
            if ph.shortfall:
                rows.append((ph.name, "SHORTFALL", "", "", "", ph.shortfall))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
        nodes = ", ".join(f"{n.name}{' (head)' if n.head else ''}: {n.cpu:g} CPU {n.gpu:g} GPU"
                          + (f" {_gib(n.memory)}" if n.memory else "") for n in self.nodes)
        out = [f"plan of {self.config}" + (f" ({self.trials} trials at once)" if self.trials > 1 else ""),
               f"nodes: {nodes}", *lines]
        for m in self.memory:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in m.parts.items())
            dev = ", ".join(f"{k} {_gib(v)}" for k, v in m.device_parts.items())
            out.append(f"memory of one {m.what}: {_gib(m.host)} ({parts})"
                       + (f"; on its GPU {_gib(m.device)} ({dev})" if dev else ""))
        out += [f"warning: {w}" for w in self.warnings]
        out.append("verdict: " + ("the run can start" if self.ok else f"cannot run: {self.shortfall}"))
        return "\n".join(out)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class _Node:
    """Free resources of one node while a phase is placed."""

    def __init__(self, shape: NodeShape):
        self.shape = shape
        self.cpu = shape.cpu
        whole = int(math.floor(shape.gpu + _EPS))
        self.gpus = [1.0] * whole + ([shape.gpu - whole] if shape.gpu - whole > _EPS else [])

    def fits(self, cpu: float, gpu: float) -> tuple[int, ...] | None:
        """The GPU devices a request would take here, () for none, None if it does not fit."""
        if self.cpu + _EPS < cpu:
            return None
        if gpu <= _EPS:
            return ()
        if gpu < 1.0 - _EPS:  # a fraction lives on one device: the fullest that still has room
            room = [(free, i) for i, free in enumerate(self.gpus) if free + _EPS >= gpu]
            return (min(room)[1],) if room else None
        need = int(round(gpu))
        free = [i for i, f in enumerate(self.gpus) if f >= 1.0 - _EPS]
        return tuple(free[:need]) if len(free) >= need else None

    def clone(self) -> "_Node":
        other = _Node(self.shape)
        other.cpu, other.gpus = self.cpu, list(self.gpus)
        return other

    def take(self, cpu: float, gpu: float, devices: tuple[int, ...]) -> None:
        self.cpu -= cpu
        for i in devices:
            self.gpus[i] -= gpu if gpu < 1.0 - _EPS else 1.0


@dataclass(frozen=True)
class _Ask:
    what: str
    count: int
    resources: dict[str, float]
    strategy: str = "ANY"      # PACK / SPREAD: a placement group, all or nothing; ANY: one by one
    memory: int = 0
    device_memory: int = 0


def _place(nodes: list[_Node], ask: _Ask) -> tuple[list[Placement], int]:
    """Place ``ask.count`` copies -> (placements, how many did not fit).

    PACK fills the node that takes the most copies first (Ray packs a placement group onto as
    few nodes as it can); SPREAD and single requests go round the nodes, most free CPUs first.
    A placement group that does not fit whole leaves ``nodes`` as they were."""
    work = [n.clone() for n in nodes]
    placements, left = _place_on(work, ask)
    if not (left and ask.strategy in ("PACK", "SPREAD")):
        for n, w in zip(nodes, work):
            n.cpu, n.gpus = w.cpu, w.gpus
    return placements, left


def _place_on(nodes: list[_Node], ask: _Ask) -> tuple[list[Placement], int]:
    cpu, gpu = float(ask.resources.get("CPU", 0.0)), float(ask.resources.get("GPU", 0.0))
    placed: dict[tuple[str, tuple[int, ...]], int] = {}
    order: list[tuple[str, tuple[int, ...]]] = []
    left = ask.count

    def put(node: _Node) -> bool:
        devices = node.fits(cpu, gpu)
        if devices is None:
            return False
        node.take(cpu, gpu, devices)
        key = (node.shape.name, devices)
        if key not in placed:
            placed[key] = 0
            order.append(key)
        placed[key] += 1
        return True

    if ask.strategy == "PACK":
        def capacity(n: _Node) -> int:
            probe = n.clone()
            k = 0
            while k < left and (dev := probe.fits(cpu, gpu)) is not None:
                probe.take(cpu, gpu, dev)
                k += 1
            return k

        for node in sorted(nodes, key=capacity, reverse=True):
            while left and put(node):
                left -= 1
    else:
        while left:
            room = [n for n in nodes if n.fits(cpu, gpu) is not None]
            if not room:
                break
            put(max(room, key=lambda n: (n.cpu, sum(n.gpus))))
            left -= 1
    if left and ask.strategy in ("PACK", "SPREAD"):
        return [], left  # a placement group is granted whole or not at all
    merged: dict[str, list] = {}
    for name, devices in order:
        m = merged.setdefault(name, [0, []])
        m[0] += placed[(name, devices)]
        m[1].extend(devices)
    out = [Placement(ask.what, name, k, cpu, gpu, ask.memory, ask.device_memory, tuple(sorted(set(devs))))
           for name, (k, devs) in merged.items()]
    return out, left


def _describe_nodes(shapes: Sequence[NodeShape], key: str = "CPU") -> str:
    """``the 2 worker nodes have 64 CPUs and the head 0`` (``key``: CPU or GPU)."""
    value = (lambda n: n.cpu) if key == "CPU" else (lambda n: n.gpu)
    heads = [n for n in shapes if n.head]
    others = [n for n in shapes if not n.head]
    unit = f"{key}s"
    if len(shapes) == 1:
        return f"the node has {value(shapes[0]):g} {unit}"
    if not heads:
        return f"the {len(others)} node{'s' if len(others) != 1 else ''} ha{'ve' if len(others) != 1 else 's'} " \
               f"{sum(map(value, others)):g} {unit}"
    if not others:
        return f"the head has {sum(map(value, heads)):g} {unit}"
    return (f"the {len(others)} worker node{'s' if len(others) != 1 else ''} ha{'ve' if len(others) != 1 else 's'} "
            f"{sum(map(value, others)):g} {unit} and the head {sum(map(value, heads)):g}")


def _res(r: Mapping[str, float]) -> str:
    cpu, gpu = r.get("CPU", 0.0), r.get("GPU", 0.0)
    return f"{cpu:g} CPU{'s' if cpu != 1 else ''}" + (f" + {gpu:g} GPU" if gpu else "")


# How a shortfall names the phase and each request.
_SUBJECT = {"old features": "the old-feature extraction", "training": "the training",
            "training (all trials)": "the trials' training", "refine: extract": "the refinement's feature extraction",
            "refine: solve": "the prototype refinement", "refine: extract (in loop)": "the refinement's feature "
            "extraction inside the loop", "refine: solve (in loop)": "the prototype refinement inside the loop"}
_SHORT = {"train worker": "workers", "decode task": "decode tasks", "extraction actor": "extraction actors",
          "refinement actor": "refinement actors", "trial driver": "trial drivers"}


def in_loop_extract_cpus(cfg: "TrainConfig", cluster_cpus: float, trials: int = 1) -> float:
    """CPUs of each extraction actor of a refinement inside a running loop: what the held workers
    leave, less one CPU (the training data's decode tasks still in flight), shared by the actors,
    at most ``extract_cpus``, at least 0.2 in all. ``unibct_ray.distributed.train._live_prototypes`` asks for exactly this."""
    free = cluster_cpus - trials * cfg.num_workers * cfg.cpus_per_worker
    return min(cfg.extract_cpus, max(free - 1.0, 0.2) / cfg.extract_actors)


def decode_cpus_wanted(cfg: "TrainConfig") -> float:
    """Decode CPUs that keep the run's GPUs fed (:data:`DECODE_CPUS_PER_GPU_112`), 0 on CPU."""
    if not cfg.use_gpu:
        return 0.0
    return DECODE_CPUS_PER_GPU_112 * cfg.num_workers * (cfg.data.image_size / 112) ** 2


def _phase(name: str, shapes: Sequence[NodeShape], asks: Sequence[_Ask], fix: Mapping[str, str]) -> PhasePlan:
    """Place ``asks`` in order on fresh ``shapes``; the first that does not fit is the shortfall."""
    nodes = [_Node(s) for s in shapes]
    placements: list[Placement] = []
    shortfall = None
    held: list[str] = []
    for ask in asks:
        if ask.count < 1:
            continue
        got, missing = _place(nodes, ask)
        placements += got
        if missing:
            key = "GPU" if ask.resources.get("GPU") and not _cpu_short(nodes, ask) else "CPU"
            if ask.count == 1:
                need = f"{_res(ask.resources)} for a {ask.what}"
            else:
                need = f"{ask.count} {_SHORT.get(ask.what, ask.what)} x {_res(ask.resources)}"
            subject = "the training ingest" if ask.what == "decode task" else _SUBJECT.get(name, name)
            where = f" beside {' and '.join(held)}" if held else ""
            shortfall = f"plan: {subject} needs {need}{where}, but {_describe_nodes(shapes, key)}: " \
                        f"{fix.get(ask.what, 'add resources').format(key=key)}"
            break
        if ask.what != "trial driver":
            held.append(f"{ask.count} {_SHORT.get(ask.what, ask.what)} x {_res(ask.resources)}")
    left = {n.shape.name: (round(n.cpu, 6), round(sum(n.gpus), 6)) for n in nodes}
    return PhasePlan(name, tuple(placements), left, shortfall)


def _cpu_short(nodes: list[_Node], ask: _Ask) -> bool:
    return sum(n.cpu for n in nodes) + _EPS < ask.count * ask.resources.get("CPU", 0.0)


def _phases(cfg: "TrainConfig", shapes: Sequence[NodeShape], *, trials: int, in_loop: bool,
            num_classes: int | None, old_backbone: str | None) -> list[PhasePlan]:
    worker = train_worker_resources(cfg)
    decode = decode_task_resources(cfg)
    mem_w = train_worker_memory(cfg, num_classes)
    mem_x = extract_actor_memory(cfg)
    mem_old = extract_actor_memory(cfg, old_backbone)
    cpu_total = sum(n.cpu for n in shapes)
    hint = _worker_cpu_hint(cfg, shapes, trials)
    fix = {
        "decode task": f"lower cpus_per_worker{hint} or decode_cpus, or add CPUs",
        "train worker": "lower num_workers or cpus_per_worker, or add {key}s",
        "extraction actor": "lower extract_actors or extract_cpus" + (" or extract_gpus" if cfg.use_gpu else "")
                            + ", or add CPUs",
        "refinement actor": "lower refine_actors" + (" or extract_gpus" if cfg.use_gpu else "") + ", or add CPUs",
        "trial driver": "lower max_concurrent",
    }
    # Other trials keep training while one trial extracts or refines.
    others: list[_Ask] = []
    for _ in range(trials - 1):
        others += [_Ask("train worker", cfg.num_workers, worker, "PACK", mem_w.host, mem_w.device),
                   _Ask("decode task", 1, decode)]
    drivers = [_Ask("trial driver", trials, {"CPU": TUNE_TRIAL_CPU})] if trials > 1 else []

    phases = []
    if cfg.compat.method != "independent":
        phases.append(_phase("old features", shapes, [
            _Ask("extraction actor", cfg.extract_actors, extract_actor_resources(cfg), "ANY", mem_old.host,
                 mem_old.device)], fix))
    train_asks = list(drivers)
    for _ in range(trials):
        train_asks += [_Ask("train worker", cfg.num_workers, worker, "PACK", mem_w.host, mem_w.device)]
    train_asks += [_Ask("decode task", trials, decode)]
    name = "training" if trials == 1 else "training (all trials)"
    phases.append(_phase(name, shapes, train_asks, fix))
    if cfg.compat.method == "unibct" and cfg.compat.refine and cfg.compat.refine_epochs:
        if in_loop:
            cpus = in_loop_extract_cpus(cfg, cpu_total, trials)
            held = [*drivers, *[_Ask("train worker", cfg.num_workers, worker, "PACK", mem_w.host, mem_w.device)
                                for _ in range(trials)]]
            held += [_Ask("decode task", trials - 1, decode)] if trials > 1 else []
            phases.append(_phase("refine: extract (in loop)", shapes, [
                *held,
                _Ask("extraction actor", cfg.extract_actors, extract_actor_resources(cfg, cpus), "ANY",
                     mem_x.host, mem_x.device)], fix))
            phases.append(_phase("refine: solve (in loop)", shapes, [
                *held, _Ask("refinement actor", cfg.refine_actors, refine_actor_resources(cfg), "SPREAD")], fix))
        else:
            phases.append(_phase("refine: extract", shapes, [
                *drivers, *others,
                _Ask("extraction actor", cfg.extract_actors, extract_actor_resources(cfg), "ANY", mem_x.host,
                     mem_x.device)], fix))
            phases.append(_phase("refine: solve", shapes, [
                *drivers, *others, _Ask("refinement actor", cfg.refine_actors, refine_actor_resources(cfg), "SPREAD")],
                fix))
    return phases


def _worker_cpu_hint(cfg: "TrainConfig", shapes: Sequence[NodeShape], trials: int) -> str:
    """`` (e.g. 6)``: the largest whole cpus_per_worker below the current one whose training
    phase fits with the decode CPUs :func:`decode_cpus_wanted` asks for (else that just fits)."""
    decode = decode_task_resources(cfg)
    fallback = None
    for cpus in range(int(math.ceil(cfg.cpus_per_worker)) - 1, 0, -1):
        c = replace(cfg, cpus_per_worker=float(cpus))
        asks = [_Ask("train worker", c.num_workers, train_worker_resources(c), "PACK") for _ in range(trials)]
        want = max(trials * decode["CPU"], trials * decode_cpus_wanted(c))
        k = max(trials, int(math.ceil(want / decode["CPU"] - _EPS)))
        if _phase("probe", shapes, [*asks, _Ask("decode task", k, decode)], {}).shortfall is None:
            return f" (e.g. {cpus})"
        if fallback is None and _phase("probe", shapes, [*asks, _Ask("decode task", trials, decode)],
                                       {}).shortfall is None:
            fallback = cpus
    return f" (e.g. {fallback})" if fallback is not None else ""


def _warnings(cfg: "TrainConfig", shapes: Sequence[NodeShape], phases: Sequence[PhasePlan],
              trials: int) -> list[str]:
    out = []
    train = next((p for p in phases if p.name.startswith("training")), None)
    if train is not None and train.shortfall is None and cfg.use_gpu:
        # What the workers leave: the free CPUs plus those the decode tasks were placed on
        # (a trial driver's hundredth of a CPU does not count).
        left = sum(c for c, _ in train.left.values()) + trials * decode_task_resources(cfg)["CPU"]
        left += (trials * TUNE_TRIAL_CPU if trials > 1 else 0.0)
        want = trials * decode_cpus_wanted(cfg)
        if left + _EPS < want:
            out.append(f"plan: {left:g} CPUs are left for decoding beside {trials * cfg.num_workers} GPU workers, "
                       f"fewer than the {want:g} that keep them fed ({DECODE_CPUS_PER_GPU_112:g} per GPU at 112 px): "
                       "lower cpus_per_worker or add CPUs")
    for ph in phases:
        if ph.shortfall is not None:
            continue
        per_node: dict[str, int] = {}
        for pl in ph.placements:
            per_node[pl.node] = per_node.get(pl.node, 0) + pl.count * pl.memory
        for n in shapes:
            if n.memory and per_node.get(n.name, 0) > n.memory:
                out.append(f"plan: {ph.name}: the processes on {n.name} need about {_gib(per_node[n.name])} "
                           f"of its {_gib(n.memory)} (estimate): lower data.shuffle_buffer, global_batch or "
                           "extract_batch, or use nodes with more memory")
    return out


def plan_run(cfg: "TrainConfig", nodes: Sequence[Mapping[str, Any] | NodeShape], *, trials: int = 1,
             in_loop: bool = False, num_classes: int | None = None, old_backbone: str | None = None,
             name: str | None = None) -> ResourcePlan:
    """The resource plan of ``cfg`` on ``nodes`` (resource dicts or :class:`NodeShape`).

    ``trials``: Tune trials at once; ``in_loop``: refinement inside a running ``fit()``
    (``train_group``) rather than between fits (``train``); ``num_classes`` sizes the head in
    the memory estimate (None: left out); ``old_backbone``: the old model's, for the old-feature
    pass. Never raises for a shortfall: see :func:`check_plan`.
    """
    shapes = [n if isinstance(n, NodeShape) else node_shapes([n])[0] for n in nodes]
    # Distinct names, so the table can say where each request went.
    seen: dict[str, int] = {}
    named = []
    for i, s in enumerate(shapes):
        k = seen.get(s.name, 0)
        seen[s.name] = k + 1
        named.append(s if k == 0 else replace(s, name=f"{s.name}-{k}"))
    phases = _phases(cfg, named, trials=trials, in_loop=in_loop, num_classes=num_classes, old_backbone=old_backbone)
    memory = [train_worker_memory(cfg, num_classes)]
    if cfg.compat.method != "independent":
        memory.append(extract_actor_memory(cfg, old_backbone))
    return ResourcePlan(name or cfg.name, tuple(named), tuple(phases), tuple(_warnings(cfg, named, phases, trials)),
                        tuple(memory), trials)


def check_plan(plan: ResourcePlan) -> ResourcePlan:
    """``plan`` unchanged when every phase can run; otherwise ``UserError`` with the shortfall."""
    if not plan.ok:
        raise UserError(plan.shortfall)
    return plan
