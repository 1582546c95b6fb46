"""The streaming merge engine.

run_merge reads one parameter tensor at a time from every input checkpoint, merges it
with the method's per-tensor function in float32, and appends the result to the output
shard being written, so memory holds a few tensors per expert, never whole models:

    validate inputs (headers, configs, names, shapes, dtypes)   -- nothing written yet
    for each tensor name (reference storage order):
        read base + experts (a reader thread fetches the next tensor meanwhile)
        (data-aware methods: + each expert's statistics of this tensor, mergescale.merge.statistics)
        check finite -> to device, float32 -> method(...) -> output dtype -> shard file
        (a tensor whose inputs exceed STREAM_BYTES, e.g. a 3B model's embedding, of a
        method with a block-wise form: read by ranges, merged and written piece by
        piece, so memory holds a few blocks of it)
    copy config/tokenizer files, write merge_card.json + README.md
    os.replace(temporary sibling directory, out_dir)     -- mergescale.io_utils.atomic_directory

Any error removes the temporary directory, so out_dir either is complete or absent; a
merge killed outright leaves a `.<out_dir name>.*.tmp` sibling that the next attempt
removes. A failed write (disk full) raises OutputWriteError naming the file.
Randomised methods get a generator seeded from (seed, tensor name): results do not
depend on iteration order, prefetching or thread count of the reader.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from mergescale.io_utils import OutputWriteError, atomic_directory, reporting_write_errors
import mergescale.merge.card as card_module
from mergescale.merge.checkpoint import Checkpoint
from mergescale.merge.compiled import count_non_finite, to_dtype
from mergescale.merge.errors import MergeInputError
from mergescale.merge.layout import MergeLayout, TensorJob
from mergescale.merge.ops import SCRATCH, tensor_seed
from mergescale.merge.output import ShardedWriter, copy_model_files
from mergescale.merge.registry import MergeMethod, ResolvedParams, get_method, validate_params
from mergescale.merge.safetensors_io import PlannedTensor
from mergescale.merge.validation import check_configs, check_finite, check_jobs, check_tensors

log = logging.getLogger("mergescale.merge")

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
# Prefetch the next tensor only when it is at most this big, to bound memory.
PREFETCH_MAX_BYTES = 256 * 2**20
# A tensor whose inputs together take more than this is merged block by block, read
# from the files by ranges, when its method can (MergeMethod.blocks): memory then
# holds a few blocks of it, not the inputs (a 3B model's embedding: 0.8 GB per input).
STREAM_BYTES = 256 * 2**20


@dataclass
class MergeRequest:
    """Everything that determines a merge. Paths may be str or Path.

    dtype: output dtype for floating tensors ("float32", "bfloat16", "float16"), or None
        to keep the dtype of each tensor's first input (the base when there is one).
        Inputs may mix float dtypes: every method computes in float32.
    params: global hyperparameters, plus per-expert ones applying to every expert.
    expert_params: per-expert overrides, one dict per expert (or None).
    """

    method: str
    experts: list[Path]
    out_dir: Path
    base: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    expert_params: list[dict[str, Any]] | None = None
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    allow_pickle: bool = False
    overwrite: bool = False
    prefetch: bool = True
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    # Data-aware methods (see mergescale.merge.data_aware): one statistics directory per
    # expert, values learned from data before streaming, and what to add to the card.
    stats: list[Path] | None = None
    fitted: dict[str, Any] | None = None
    card_extra: dict[str, Any] | None = None
    # A merge config's layout (mergescale.merge.layout): inputs, slices and per-tensor
    # parameter settings. When given, it decides every output tensor; base and experts
    # then only describe the merge on its card.
    layout: MergeLayout | None = None

    def __post_init__(self) -> None:
        self.experts = [Path(p) for p in self.experts]
        self.out_dir = Path(self.out_dir)
        self.base = Path(self.base) if self.base is not None else None
        self.stats = [Path(p) for p in self.stats] if self.stats is not None else None


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    card: dict[str, Any]


def _check_request(req: MergeRequest, method: MergeMethod) -> None:
    if not req.experts and req.layout is None:
        raise MergeInputError("no experts given")
    n = len(req.experts)
    if req.layout is not None:
        pass  # expert counts and bases are checked per slice when the config is parsed
    elif n < method.min_experts or (method.max_experts is not None and n > method.max_experts):
        wanted = (
            f"exactly {method.min_experts}" if method.min_experts == method.max_experts
            else f"at least {method.min_experts}" + (f" and at most {method.max_experts}" if method.max_experts else "")
        )
        raise MergeInputError(f"{method.name} merges {wanted} experts, got {n}")
    if method.needs_base and req.base is None and req.layout is None:
        raise MergeInputError(f"{method.name} needs a base model (base_model)")
    if req.dtype is not None and req.dtype not in OUTPUT_DTYPES:
        raise MergeInputError(f"dtype {req.dtype!r} is not one of {sorted(OUTPUT_DTYPES)}")
    if req.device not in ("cpu", "cuda") and not req.device.startswith("cuda:"):
        raise MergeInputError(f"device {req.device!r}: expected 'cpu' or 'cuda'")
    if req.device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeInputError(f"device {req.device!r} requested but CUDA is not available")
    if req.threads is not None and req.threads < 1:
        raise MergeInputError(f"threads must be >= 1, got {req.threads}")
    if req.max_shard_bytes < 1:
        raise MergeInputError(f"max_shard_bytes must be positive, got {req.max_shard_bytes}")
    if req.out_dir.exists() and not req.overwrite:
        raise MergeInputError(f"{req.out_dir} already exists (pass overwrite=True to replace it)")
    if method.needs_data and req.fitted is None:
        raise MergeInputError(
            f"{method.name} learns from validation data: run it with "
            "mergescale.merge.data_aware.merge_with_data (the workflow's merge rule does)"
        )
    if method.stats and (req.stats is None or len(req.stats) != n):
        raise MergeInputError(
            f"{method.name} reads per-expert statistics ({', '.join(method.stats)}): "
            f"give one statistics directory per expert (got {len(req.stats or [])} for {n} experts)"
        )
    inputs = req.layout.inputs if req.layout is not None else ([req.base] if req.base else []) + req.experts
    for p in inputs:
        if p.resolve() == req.out_dir.resolve():
            raise MergeInputError(f"{req.out_dir}: output directory is also an input")


class _Reader:
    """Reads (and checks) every input tensor of one job, optionally one job ahead."""

    def __init__(self, checkpoints: list[Checkpoint], jobs: list[TensorJob], prefetch: bool):
        self.checkpoints = checkpoints
        self.jobs = jobs
        # bytes read per job over all inputs, to decide whether prefetching it is cheap
        self.sizes = [sum(torch.Size(checkpoints[c].shape(n)).numel() * checkpoints[c].dtype(n).itemsize
                          for c, n in job.sources) for job in jobs]
        # one worker: reads happen in order, on one thread, so file handles are never shared
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader")
        self._prefetch = prefetch
        self._pending: dict[int, Future] = {}

    def _load(self, i: int) -> list[torch.Tensor]:
        tensors = []
        for c, name in self.jobs[i].sources:
            t = self.checkpoints[c].read(name)
            check_finite(t, name, self.checkpoints[c])
            tensors.append(t)
        return tensors

    def get(self, i: int) -> list[torch.Tensor]:
        future = self._pending.pop(i, None) or self._pool.submit(self._load, i)
        nxt = i + 1
        if self._prefetch and nxt < len(self.jobs) and self.sizes[nxt] <= PREFETCH_MAX_BYTES:
            self._pending[nxt] = self._pool.submit(self._load, nxt)
        return future.result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)


def _merge_one(
    method: MergeMethod,
    tensors: list[torch.Tensor],
    has_base: bool,
    expert_params: list[dict],
    params: dict,
    seed: int,
    name: str,
    device: torch.device,
    stats: list[dict[str, torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """Merge one tensor: returns float32 on `device`."""
    tensors = [t.to(device, non_blocking=True) for t in tensors]
    if len({t.dtype for t in tensors}) > 1:  # mixed float dtypes: compute in float32
        tensors = [t.float() for t in tensors]
    base = tensors[0] if has_base else None
    experts = tensors[1:] if has_base else tensors
    generator = _generator(method, seed, name, device)
    extra = {}
    if method.stats:  # only data-aware methods take the keyword
        extra["stats"] = [{k: None if v is None else v.to(device) for k, v in s.items()} for s in stats]
    try:
        merged = method.function(base, experts, expert_params, params, generator, name, **extra)
    except MergeInputError as e:
        raise MergeInputError(f"{method.name}, tensor {name!r}: {e}") from e
    if tuple(merged.shape) != tuple(experts[0].shape):
        raise RuntimeError(f"{method.name} returned shape {list(merged.shape)} for {name!r}")
    if count_non_finite(merged):
        raise MergeInputError(
            f"{method.name} produced NaN/Inf for tensor {name!r}; check the hyperparameters"
        )
    return merged


def _generator(method: MergeMethod, seed: int, name: str, device: torch.device) -> torch.Generator | None:
    """Randomised methods draw from a generator seeded from (seed, tensor name)."""
    if not method.randomised:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, name))
    return generator


def _merge_blocks(method: MergeMethod, sources: list, has_base: bool, expert_params: list[dict], params: dict,
                  seed: int, name: str, out_dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Merge one tensor block by block from sources read by ranges (safetensors_io.
    FileSource): yields the merged flat pieces in `out_dtype`, in order."""
    base = sources[0] if has_base else None
    experts = sources[1:] if has_base else sources
    generator = _generator(method, seed, name, torch.device("cpu"))
    blocks = method.blocks(base, experts, expert_params, params, generator, name)
    while True:
        try:
            item = next(blocks, None)
        except MergeInputError as e:
            raise MergeInputError(f"{method.name}, tensor {name!r}: {e}") from e
        if item is None:
            return
        if count_non_finite(item[2]):
            raise MergeInputError(f"{method.name} produced NaN/Inf for tensor {name!r}; check the hyperparameters")
        yield to_dtype(item[2], out_dtype)


def _streamed(method: MergeMethod, checkpoints: list[Checkpoint], job: TensorJob, nbytes: int,
              device: torch.device) -> bool:
    """Whether this tensor is merged block by block from the files (see STREAM_BYTES)."""
    return (method.blocks is not None and device.type == "cpu" and nbytes > STREAM_BYTES
            and all(checkpoints[c].is_safetensors and checkpoints[c].dtype(n).is_floating_point
                    for c, n in job.sources))


_ALLOCATOR_TUNED = False


def _tune_allocator() -> None:
    """Keep freed heap memory for reuse instead of returning it to the OS.

    By default glibc hands freed memory back once more than twice its (adaptive) mmap
    threshold is free, so every chunk-sized temporary of the next tensor page-faults
    afresh: a quarter of a merge's CPU time went to the kernel. Process-wide and best
    effort: a no-op where the C library has no mallopt.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap
    mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD: keep up to 128 MB of free heap
    # M_ARENA_MAX: every thread (reader, block workers) would get an arena of its own,
    # each keeping freed memory up to the trim threshold
    mallopt(-8, 2)


def run_merge(req: MergeRequest) -> MergeResult:
    """Merge `req.experts` (and `req.base`) into `req.out_dir`; see the module docstring."""
    start = time.perf_counter()
    _tune_allocator()
    method = get_method(req.method)
    _check_request(req, method)
    if req.layout is None:
        resolved = validate_params(method, req.params, req.expert_params, n_experts=len(req.experts))
    else:  # resolved per tensor by the layout; these (the constant settings) describe it
        resolved = ResolvedParams(params=dict(req.params),
                                  expert_params=list(req.expert_params or [{} for _ in req.experts]))
    out_dtype = OUTPUT_DTYPES[req.dtype] if req.dtype else None
    device = torch.device(req.device)

    base_path = req.base
    if base_path is not None and not method.uses_base and req.layout is None:
        log.warning("%s does not use a base model; ignoring %s", method.name, base_path)
        base_path = None
    has_base = base_path is not None
    if req.layout is not None:
        paths = list(req.layout.inputs)
    else:
        paths = ([base_path] if has_base else []) + req.experts
    checkpoints: list[Checkpoint] = []
    stats_reader = None
    old_threads = torch.get_num_threads()
    try:
        for p in paths:
            checkpoints.append(Checkpoint(p, allow_pickle=req.allow_pickle))
        check_configs(checkpoints)
        n_layers = None
        if req.layout is not None:
            jobs, n_layers = req.layout.expand(method, checkpoints)
            check_jobs(checkpoints, jobs)
            ref = checkpoints[req.layout.reference]
        else:
            jobs = [TensorJob(n, tuple((i, n) for i in range(len(checkpoints))), has_base)
                    for n in check_tensors(checkpoints)]
            ref = checkpoints[0]
        names = [job.name for job in jobs]

        def output_dtype(job: TensorJob) -> torch.dtype:
            c, n = job.sources[0]
            dt = checkpoints[c].dtype(n)
            return out_dtype if (out_dtype is not None and dt.is_floating_point) else dt

        plan = [PlannedTensor(job.name, output_dtype(job), checkpoints[job.sources[0][0]].shape(job.sources[0][1]))
                for job in jobs]
        params = dict(resolved.params)
        if method.setup is not None:
            params.update(method.setup(names, ref.config))
        params.update(req.fitted or {})
        stats_reader = None
        if method.stats:
            from mergescale.merge.statistics import StatsReader  # data-free merges never import it

            stats_reader = StatsReader(method.stats, req.stats)
        if req.threads:
            torch.set_num_threads(req.threads)

        # Everything is written into a temporary sibling that becomes out_dir only when
        # complete; any error (or a kill, cleared by the next attempt) leaves no out_dir.
        with atomic_directory(req.out_dir, replace=req.overwrite) as tmp, \
                _naming_final_paths(tmp, req.out_dir):
            log.info("merging %d tensors of %d inputs with %s into %s",
                     len(names), len(paths), method.name, req.out_dir)
            n_parameters, writer = _stream(req, method, checkpoints, jobs, plan,
                                           resolved.expert_params, params, device, tmp, start,
                                           stats_reader)
            copied = copy_model_files(ref.path, tmp, out_dtype, n_layers=n_layers)
            card = {
                **card_module.describe(
                    method=method.name, description=method.description, paper=method.paper,
                    params=resolved.params, base=base_path, experts=req.experts,
                    expert_params=resolved.expert_params, seed=req.seed,
                    dtype=req.dtype or "as input", device=req.device,
                ),
                "threads": torch.get_num_threads(),
                "n_tensors": len(names),
                "n_parameters": n_parameters,
                "output_bytes": writer.total_bytes,
                "shards": writer.names,
                "copied_files": copied,
                **card_module.cost(start),
            }
            if stats_reader is not None:
                card["stats"] = {"kinds": list(method.stats), "dirs": [str(p) for p in req.stats],
                                 "cards": stats_reader.cards()}
            card.update(req.card_extra or {})
            with reporting_write_errors(tmp / card_module.CARD_NAME):
                card_module.write_card(tmp, card)
        log.info("merged %s in %.1f s", req.out_dir, card["wall_time_s"])
        return MergeResult(req.out_dir, card)
    except FileExistsError as e:  # out_dir appeared while merging, and overwrite is off
        raise MergeInputError(str(e)) from None
    finally:
        for c in checkpoints:
            c.close()
        if stats_reader is not None:
            stats_reader.close()
        SCRATCH.clear()
        torch.set_num_threads(old_threads)


@contextmanager
def _naming_final_paths(tmp: Path, out_dir: Path) -> Iterator[None]:
    """Report a failed write under the name the file would have had in out_dir: the
    temporary directory it was written in is gone by the time the user reads this."""
    try:
        yield
    except OutputWriteError as e:
        if not e.path.is_relative_to(tmp):
            raise
        raise OutputWriteError(out_dir / e.path.relative_to(tmp), e.cause,
                               note="the merge was abandoned and its temporary files removed") from e.cause


def _stream(
    req: MergeRequest,
    method: MergeMethod,
    checkpoints: list[Checkpoint],
    jobs: list[TensorJob],
    plan: list[PlannedTensor],
    expert_params: list[dict],
    params: dict,
    device: torch.device,
    tmp: Path,
    start: float,
    stats_reader=None,
) -> tuple[int, ShardedWriter]:
    """Read, merge and write every tensor into shards in `tmp`; returns (parameters, writer)."""
    writer = ShardedWriter(tmp, plan, req.max_shard_bytes)
    reader = _Reader(checkpoints, jobs, req.prefetch)
    n_parameters = 0
    try:
        bar = tqdm(total=len(jobs), unit="tensor", desc=f"merge {method.name}", file=sys.stderr,
                   disable=None if req.progress is None else not req.progress)
        log_every = max(1, len(jobs) // 10)  # log lines stand in for the bar in log files
        for i, (job, planned) in enumerate(zip(jobs, plan)):
            name = job.name
            if _streamed(method, checkpoints, job, reader.sizes[i], device):
                job_params = params if job.params is None else {**params, **job.params}
                writer.write_pieces(name, _merge_blocks(
                    method, [checkpoints[c].source(n) for c, n in job.sources], job.has_base,
                    expert_params if job.expert_params is None else job.expert_params,
                    job_params, req.seed, name, planned.dtype))
                n_parameters += torch.Size(planned.shape).numel()
            else:
                tensors = reader.get(i)
                if tensors[0].is_floating_point():
                    stats = stats_reader.get(name, plan[i].shape) if stats_reader else None
                    job_params = params if job.params is None else {**params, **job.params}
                    merged = _merge_one(method, tensors, job.has_base,
                                        expert_params if job.expert_params is None else job.expert_params,
                                        job_params, req.seed, name, device, stats)
                else:  # integer buffers (e.g. position ids) are not merged: copy the reference
                    merged = tensors[0]
                del tensors
                writer.write(name, to_dtype(merged, planned.dtype).cpu())
                n_parameters += merged.numel()
                del merged
            bar.update(1)
            if bar.disable and ((i + 1) % log_every == 0 or i + 1 == len(jobs)):
                log.info("merged %d/%d tensors (%.0f s)", i + 1, len(jobs), time.perf_counter() - start)
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    return n_parameters, writer
