"""Run a network at one fixed batch size, optionally compiled with torch.compile.

A compiled graph is specialised to its input shapes: a batch of 7 after a batch of 32 would
compile again (a minute for the UNet), in the middle of a request. `FixedBatch` cuts its input
into chunks of exactly `batch_size` rows and pads the last chunk by repeating its final row, so
the network only ever sees one shape; the padding rows' outputs are dropped. Uncompiled (the CPU
path, tests) the last chunk is not padded: there is no graph to keep, and padding is wasted work.

Compilation itself (`torch.compile`, default mode, `dynamic=False`) happens on the first call,
which `warmup` makes at start-up. A compiled graph is also specialised to its inputs' memory
layout and to whether they are inference tensors: a channels-last view (what `permute` of an HWC
upload gives), or a tensor made inside `torch.inference_mode` after a warm-up input made outside
it, compiles again. Measured on the H100 (2026-11-24): that made the first request after a start
recompile FAN and the VAE encoder, 13 fps instead of 80 on a new 1080p video. So a compiled
runner hands its network contiguous inference tensors only, whatever it was given.

Inductor keeps what it compiled in its cache directory (`use_compile_cache`), so a restart loads
kernels instead of compiling them again.

`cuda_graph`: on CUDA, `warmup` also records the (compiled) network into one `torch.cuda.CUDAGraph`
at the fixed batch, and each chunk is then copied into the graph's input buffers and replayed:
one launch instead of the hundreds of kernel launches Python makes per call (measured on the H100,
2026-11-24: 2.2 ms of CPU per output frame for the UNet + VAE decoder, the warm path's bound).
This is our own capture, not torch.compile's `reduce-overhead`: its CUDA graph trees belong to
the thread that recorded them, and our networks run in the face and GPU threads of a request
(with `reduce-overhead` the first request hung). A graph's intermediate tensors live in a memory
pool of its own for as long as the runner does (`warmup` logs how much): that is why it pays only
where launches are the cost (measured on the H100, 2026-11-24: the VAE encoder's graph at batch 32
held 6.1 GB and made preparation no faster; FAN's held 0.47 GB, the generator's little).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def use_compile_cache(cache_dir: str | os.PathLike) -> Path:
    """Point Inductor's on-disk cache (compiled graphs, Triton kernels) at `cache_dir`.

    An explicit `TORCHINDUCTOR_CACHE_DIR` in the environment wins: operators who already set it
    keep their cache. Must run before the first compilation.
    """
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir).expanduser())))
    path.mkdir(parents=True, exist_ok=True)
    return path


class FixedBatch(nn.Module):
    """`module(*tensors)` computed in chunks of exactly `batch_size` rows (see the module docstring).

    Every input is batched along dim 0 with the same number of rows; the module returns one
    tensor batched the same way. `compile_mode` None runs the module as it is; otherwise it is
    `torch.compile`d with that mode. `pad` forces padding without compiling (tests use it to check
    the padding on CPU). `cuda_graph` (implies padding): replay a CUDA graph recorded by `warmup`
    on a CUDA device (ignored elsewhere). Calls run under `torch.inference_mode`.
    """

    def __init__(
        self,
        module: nn.Module,
        batch_size: int,
        compile_mode: str | None = None,
        *,
        cuda_graph: bool = False,
        pad: bool | None = None,
        backend: str | Callable = "inductor",
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES} or None, got {compile_mode!r}")
        self.module = module
        self.eval()  # inference only: no dropout, BatchNorm on its running statistics
        self.batch_size = batch_size
        self.compile_mode = compile_mode
        self.pad = compile_mode is not None or cuda_graph if pad is None else pad
        if cuda_graph and not self.pad:
            raise ValueError("a CUDA graph needs the fixed batch: cuda_graph=True with pad=False")
        self.cuda_graph = cuda_graph
        self.graph: _GraphReplay | None = None
        """The recorded graph, once `warmup` has made it (on CUDA only)."""
        compiled = module if compile_mode is None else torch.compile(module, mode=compile_mode, backend=backend, dynamic=False)
        # Outside nn.Module's registry: the compiled wrapper holds the same parameters.
        object.__setattr__(self, "_run", compiled)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        rows = tensors[0].shape[0]
        if any(t.shape[0] != rows for t in tensors):
            raise ValueError(f"inputs disagree on the batch: {[t.shape[0] for t in tensors]} rows")
        if rows == 0:
            raise ValueError("an empty batch")
        outputs = []
        with torch.inference_mode():
            for start in range(0, rows, self.batch_size):
                chunk = [t[start : start + self.batch_size] for t in tensors]
                if self.graph is not None:
                    outputs.append(self.graph(chunk))
                    continue
                if self.compile_mode is not None:
                    chunk = [_as_graph_input(t) for t in chunk]
                size = chunk[0].shape[0]
                if self.pad and size < self.batch_size:
                    chunk = [_pad_rows(t, self.batch_size) for t in chunk]
                outputs.append(self._run(*chunk)[:size])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def warmup(self, *example_rows: torch.Tensor) -> float:
        """One batch made from one example row per input: a full batch when padding (that call
        compiles, when compiling), else one row. Returns the seconds taken.

        A compilation that fails (no C compiler for Triton's launcher, an unsupported GPU) is
        logged and the network runs eagerly: slower, but the service starts. With `cuda_graph` on
        a CUDA device the graph is recorded next; a recording that fails is logged and the
        network runs without it.
        """
        started = time.perf_counter()
        name = type(self.module).__name__
        try:
            self(*(_pad_rows(t[:1], self.batch_size if self.pad else 1) for t in example_rows))
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to eager
            if self.compile_mode is None:
                raise
            logger.error("torch.compile of %s failed, running it eagerly: %s", name, exc)
            object.__setattr__(self, "_run", self.module)
            self.compile_mode, self.pad = None, self.cuda_graph
            self(*(_pad_rows(t[:1], self.batch_size if self.pad else 1) for t in example_rows))
        how = self.compile_mode or "eager"
        if self.cuda_graph and self.graph is None and example_rows[0].is_cuda:
            device = example_rows[0].device
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # so that the difference below is the graph's own memory
            held = torch.cuda.memory_reserved(device)
            try:
                examples = [_pad_rows(t[:1], self.batch_size) for t in example_rows]
                self.graph = _GraphReplay(self._run, examples)
            except Exception as exc:  # noqa: BLE001 - any recording failure: run without the graph
                logger.error("recording a CUDA graph of %s failed, running it without one: %s", name, exc)
            else:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()  # the warm-up runs' blocks, cached on a side stream
                added = (torch.cuda.memory_reserved(device) - held) / 2**30
                how += f" + CUDA graph, {added:.2f} GB more held"
        if example_rows[0].is_cuda:
            torch.cuda.synchronize(example_rows[0].device)
        elapsed = time.perf_counter() - started
        logger.info("%s ready at batch %d (%s) in %.1f s", name, self.batch_size, how, elapsed)
        return elapsed


class _GraphReplay:
    """`run` recorded once into a CUDA graph at the shapes of `examples` (full batches), replayed
    on fresh inputs: copied into the graph's input buffers, the result copied out of its output.

    Safe from several threads and streams: the lock orders the calls, and each call's stream
    waits until the previous call's output was copied out before overwriting the buffers (the
    next replay writes the same output memory).
    """

    def __init__(self, run: Callable[..., torch.Tensor], examples: list[torch.Tensor]):
        device = examples[0].device
        with torch.inference_mode():
            # Inference tensors, contiguous: what a compiled `run` was specialised for.
            self.inputs = [t.clone(memory_format=torch.contiguous_format) for t in examples]
            # Before recording: a few runs on a side stream, as CUDA graphs require (lazy
            # initialisation such as cuBLAS workspaces must not happen during the recording).
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    run(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads may use the GPU meanwhile (a health probe, say).
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = run(*self.inputs)
        self.batch_size = examples[0].shape[0]
        self._device = device
        self._lock = threading.Lock()
        self._copied_out: torch.cuda.Event | None = None

    def __call__(self, chunk: list[torch.Tensor]) -> torch.Tensor:
        """The output rows for `chunk` (at most `batch_size` rows per input; fewer are padded
        with the last row), in a tensor of its own."""
        size = chunk[0].shape[0]
        with self._lock:
            stream = torch.cuda.current_stream(self._device)
            if self._copied_out is not None:
                stream.wait_event(self._copied_out)
            for buffer, rows in zip(self.inputs, chunk, strict=True):
                buffer[:size].copy_(rows)
                if size < self.batch_size:
                    buffer[size:].copy_(rows[-1:].expand(self.batch_size - size, *rows.shape[1:]))
            self.graph.replay()
            out = self.output[:size].clone()
            self._copied_out = torch.cuda.Event()
            self._copied_out.record(stream)
        return out


def _as_graph_input(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the compiled graph was specialised for: contiguous, an inference tensor (a
    copy only where it is not already both; called inside `torch.inference_mode`)."""
    if tensor.is_contiguous() and tensor.is_inference():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` grown to `rows` rows by repeating its last row (real data: no NaN/inf surprises)."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
