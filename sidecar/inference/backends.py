"""Backends turn padded token ids into logits: ONNX Runtime (CUDA, else CPU) or PyTorch.

Which one runs is decided once at load time by :func:`open_backend` from ``ModelConfig.runtime`` and
``ModelConfig.device`` and the files the model directory holds, and is logged and shown by
``Engine.describe()``. Torch is imported only when the PyTorch backend is chosen.

An ONNX Runtime pass can be stopped half-way (a :class:`StopToken`), so a pass whose callers have all gone
stops using the CPU; a PyTorch pass always runs to its end.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import structlog

from model_contract.model_dir import ONNX_FILE, ONNX_INT8_FILE, WEIGHTS_FILE, ModelDir
from sidecar.config import ModelConfig
from sidecar.errors import InferenceCancelled, ModelLoadError

log = structlog.get_logger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class StopToken:
    """Asks one forward pass to stop early; `stop` may be called from any thread, before or during it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.stopped = False

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Call `hook` (on the stopping thread) when the pass is asked to stop; at once if it already was."""
        with self._lock:
            if not self.stopped:
                self._hooks.append(hook)
                return
        hook()


@runtime_checkable
class Backend(Protocol):
    """One loaded model. ``run`` may be called from any single thread at a time.

    A backend that can stop a pass half-way also has ``stoppable = True`` and takes a :class:`StopToken`
    as ``run``'s third argument; a pass it stopped raises InferenceCancelled.
    """

    name: str
    """``onnx``, ``onnx-int8`` or ``torch``."""
    file: str
    """The weights file in use."""
    providers: list[str]
    """Execution providers actually in use (``cuda``/``cpu`` for torch)."""
    threads: int
    """Intra-op threads asked of the runtime (0: its own default)."""
    small_pass_tokens: int
    """Passes of at most this many padded tokens run on one thread (0: every pass on ``threads``)."""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """int64 ``[batch, seq]`` inputs -> float32 logits ``[batch, labels]`` or ``[batch, seq, labels]``."""
        ...


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices the driver sees, without importing torch; 0 when there is no driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    return cuda_device_count() > 0 and CUDA_PROVIDER in ort.get_available_providers()


def session_options(threads: int = 0):
    """ONNX Runtime settings for serving (the benchmarks' floor uses the same, so ratios measure our code)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Between batches the worker waits on its queue; spinning pool threads would only take CPU from
    # the event loop and from neighbouring containers (measured: 1.8x slower serving on 2 busy cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # The CPU arena keeps what the largest passes needed for ever (with 1,024-token passes it held ~150 MB
    # after ten 256-900 KB bodies, and kept growing). Without it, buffers go back to malloc after each
    # pass, which release_freed_memory hands back to the OS; passes measured about 5% slower on 2 cores.
    options.enable_cpu_mem_arena = False
    if threads > 0:
        options.intra_op_num_threads = threads
    return options


# The process may grow by this much over its size after the last trim before freed memory is handed back.
_TRIM_SLACK_BYTES = 64 << 20
_trim_lock = threading.Lock()
_trim_floor = 0


def release_freed_memory(slack: int = _TRIM_SLACK_BYTES) -> bool:
    """Hand the C heap's free pages back to the OS once the process has grown by `slack` since the last
    time; whether it did. glibc keeps what passes (and tokenizers) freed: ten 256-900 KB bodies left the
    sidecar at 310-380 MB RSS, and malloc_trim (13-33 ms) brought it back to ~190 MB each time (measured
    on 2 cores, no CPU arena). Call it when idle. Does nothing without glibc or /proc."""
    global _trim_floor
    trim, rss = _malloc_trim(), _rss_bytes()
    if trim is None or rss is None:
        return False
    with _trim_lock:
        if rss < _trim_floor + slack:
            return False
        trim(0)
        _trim_floor = _rss_bytes() or rss
    return True


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def pool_threads(threads: int) -> int:
    """The intra-op threads ONNX Runtime runs a CPU session on: `threads`, or with 0 one per usable core."""
    return threads if threads > 0 else usable_cores()


class OnnxBackend:
    """An ONNX Runtime session with full graph optimisation, on CUDA when asked and possible.

    On CPU with more than one intra-op thread, a second session of the same model on one thread takes the
    passes of at most `small_pass_tokens` padded tokens: with spinning off, waking the pool for every
    operator costs more than the threads save on a small input (measured on 2 cores: 16-128 tokens alone
    and 16-32 tokens x 8 ran 15-30% faster on one thread; 512 tokens and more ran faster on two).
    A pass can be stopped half-way (between operators) with a :class:`StopToken`.
    """

    stoppable = True

    def __init__(self, path: Path, name: str, cuda: bool, threads: int = 0, small_pass_tokens: int = 0):
        import onnxruntime as ort

        options = session_options(threads)
        requested = [CUDA_PROVIDER, CPU_PROVIDER] if cuda else [CPU_PROVIDER]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
        except Exception as e:  # ORT raises its own pybind exception types
            raise ModelLoadError(f"{path}: ONNX Runtime could not load it ({_one_line(e)})") from e
        inputs = {i.name for i in self._session.get_inputs()}
        if "input_ids" not in inputs:
            raise ModelLoadError(f"{path}: the graph has no 'input_ids' input (has {', '.join(sorted(inputs))})")
        self._run_options = ort.RunOptions
        self._feeds_mask = "attention_mask" in inputs
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = "logits" if "logits" in outputs else outputs[0]
        self.name = name
        self.file = str(path)
        self.threads = threads
        self.providers = list(self._session.get_providers())
        if cuda and CUDA_PROVIDER not in self.providers:
            log.warning("cuda_provider_unavailable", file=self.file, providers=self.providers)
        self._small = None
        self.small_pass_tokens = 0
        if small_pass_tokens > 0 and CUDA_PROVIDER not in self.providers and pool_threads(threads) > 1:
            self._small = ort.InferenceSession(str(path), sess_options=session_options(1), providers=[CPU_PROVIDER])
            self.small_pass_tokens = small_pass_tokens

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            stop: StopToken | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids}
        if self._feeds_mask:
            feeds["attention_mask"] = attention_mask
        small = self._small is not None and input_ids.size <= self.small_pass_tokens
        options = None
        if stop is not None:
            options = self._run_options()
            # ONNX Runtime reads the flag between operators (and before the first one).
            stop.on_stop(functools.partial(setattr, options, "terminate", True))
        try:
            (logits,) = (self._small if small else self._session).run([self._output], feeds, options)
        except Exception:  # ORT raises its own pybind exception types
            if stop is not None and stop.stopped:
                raise InferenceCancelled("forward pass stopped: its callers have gone") from None
            raise
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)


class TorchBackend:
    """The PyTorch weights through transformers; fp16 on CUDA, fp32 on CPU."""

    def __init__(self, model_dir: ModelDir, cuda: bool, threads: int = 0):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        if threads > 0:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        auto = AutoModelForSequenceClassification if model_dir.spec.head == "sequence" else AutoModelForTokenClassification
        cuda = cuda and torch.cuda.is_available()
        self._device = torch.device("cuda" if cuda else "cpu")
        try:
            model = auto.from_pretrained(model_dir.path, dtype=torch.float16 if cuda else torch.float32)
        except Exception as e:  # transformers raises OSError, ValueError, RuntimeError, ...
            raise ModelLoadError(f"{model_dir.path}: PyTorch could not load the model ({_one_line(e)})") from e
        self._model = model.to(self._device).eval()
        self._torch = torch
        self.name = "torch"
        self.threads = threads
        self.small_pass_tokens = 0
        weights = model_dir.path / WEIGHTS_FILE
        self.file = str(weights if weights.is_file() else model_dir.path / "pytorch_model.bin")
        self.providers = [self._device.type]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self._device, non_blocking=True)
            mask = torch.from_numpy(attention_mask).to(self._device, non_blocking=True)
            logits = self._model(input_ids=ids, attention_mask=mask).logits
            return logits.float().cpu().numpy()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(threads: int, cpu_share: int) -> int:
    """Intra-op threads for one of `cpu_share` models that run side by side on the CPU: the configured
    number, or with 0 an equal share of the usable cores (0 again, the runtime's own default, when the
    model has them all). Two models that each take every core slow each other down: measured through
    Envoy on 2 cores, one thread each served 5-15% more requests than two each."""
    if threads > 0 or cpu_share <= 1:
        return threads
    return max(1, usable_cores() // cpu_share)


def open_backend(model_dir: ModelDir, model_config: ModelConfig, cpu_share: int = 1) -> Backend:
    """Choose and load the backend that ``runtime``/``device`` ask for.

    ``auto`` takes ``model.int8.onnx`` on CPU (``model.onnx`` if there is no INT8 file), ``model.onnx`` on
    CUDA (INT8 gains nothing on ONNX Runtime's CUDA provider), and PyTorch when the directory has no ONNX file. An
    explicit choice that the directory or machine cannot honour is a ModelLoadError naming what is missing.
    `cpu_share`: how many models will share the CPU (see `cpu_threads`).
    """
    gpu = _gpu_present(model_config, model_dir)
    ort_gpu = gpu and ort_cuda_available()
    runtime = model_config.runtime
    threads = model_config.threads
    onnx_threads = threads if ort_gpu else cpu_threads(threads, cpu_share)
    onnx, int8 = model_dir.onnx_path, model_dir.onnx_int8_path

    if runtime != "auto":
        choice = runtime
    elif onnx is None and int8 is None:
        choice = "torch"
    elif ort_gpu:
        choice = "onnx" if onnx else "torch" if model_dir.has_torch_weights else "onnx-int8"
    else:
        choice = "onnx-int8" if int8 else "onnx"

    if choice == "onnx-int8":
        if int8 is None:
            raise ModelLoadError(f"{model_dir.path / ONNX_INT8_FILE}: runtime 'onnx-int8' needs this file")
        backend: Backend = OnnxBackend(int8, "onnx-int8", ort_gpu, onnx_threads, model_config.small_pass_tokens)
    elif choice == "onnx":
        if onnx is None:
            raise ModelLoadError(f"{model_dir.path / ONNX_FILE}: runtime 'onnx' needs this file")
        backend = OnnxBackend(onnx, "onnx", ort_gpu, onnx_threads, model_config.small_pass_tokens)
    else:
        if not model_dir.has_torch_weights:
            raise ModelLoadError(f"{model_dir.path / WEIGHTS_FILE}: runtime 'torch' needs PyTorch weights")
        backend = TorchBackend(model_dir, gpu, threads)

    if model_config.device == "cuda" and not _on_cuda(backend):
        raise ModelLoadError(f"{backend.file}: device 'cuda' was asked for but the runtime fell back to CPU")
    log.info(
        "backend_loaded",
        task=model_dir.task,
        runtime=backend.name,
        file=backend.file,
        providers=backend.providers,
        threads=backend.threads,
        small_pass_tokens=backend.small_pass_tokens,
        requested_runtime=runtime,
        requested_device=model_config.device,
    )
    return backend


def _gpu_present(model_config: ModelConfig, model_dir: ModelDir) -> bool:
    if model_config.device == "cpu":
        return False
    available = cuda_device_count() > 0
    if model_config.device == "cuda" and not available:
        raise ModelLoadError(f"{model_dir.path}: device 'cuda' was asked for but no CUDA device was found")
    return available


def _on_cuda(backend: Backend) -> bool:
    return CUDA_PROVIDER in backend.providers or "cuda" in backend.providers


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
