import shutil

import numpy as np
import pytest

from model_contract.model_dir import ModelDir
from sidecar.config import ModelConfig
from sidecar.errors import InferenceCancelled, ModelLoadError
from sidecar.inference.backends import (
    Backend,
    OnnxBackend,
    StopToken,
    TorchBackend,
    cuda_device_count,
    open_backend,
    release_freed_memory,
    session_options,
)
from tests.conftest import CATEGORY_LABELS, PII_LABELS
from tests.inference_fakes import onnx_copy


@pytest.fixture(scope="module")
def onnx_pii_dir(tiny_pii_dir, tmp_path_factory):
    return onnx_copy(tiny_pii_dir, tmp_path_factory.getbasetemp())


def cpu(path, runtime="auto") -> ModelConfig:
    return ModelConfig(path=str(path), runtime=runtime, device="cpu")


def batch(*rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), 3, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def test_auto_uses_pytorch_when_the_directory_has_no_onnx_file(tiny_pii_dir):
    backend = open_backend(ModelDir.read(tiny_pii_dir), cpu(tiny_pii_dir))
    assert isinstance(backend, TorchBackend) and isinstance(backend, Backend)
    assert backend.name == "torch" and backend.providers == ["cpu"]
    assert backend.file.endswith("model.safetensors")


def test_pytorch_backend_returns_float32_logits_per_token_and_per_text(tiny_pii_dir, tiny_category_dir):
    ids, mask = batch([1, 40, 41, 2], [1, 50, 2])
    pii = open_backend(ModelDir.read(tiny_pii_dir), cpu(tiny_pii_dir)).run(ids, mask)
    category = open_backend(ModelDir.read(tiny_category_dir), cpu(tiny_category_dir)).run(ids, mask)
    assert pii.dtype == category.dtype == np.float32
    assert pii.shape == (2, 4, len(PII_LABELS)) and category.shape == (2, len(CATEGORY_LABELS))


def test_auto_on_cpu_prefers_int8_onnx_when_present(onnx_pii_dir, tmp_path):
    copy = shutil.copytree(onnx_pii_dir, tmp_path / "m")
    shutil.copy(copy / "model.onnx", copy / "model.int8.onnx")  # any valid graph: this checks the choice
    backend = open_backend(ModelDir.read(copy), cpu(copy))
    assert isinstance(backend, OnnxBackend)
    assert backend.name == "onnx-int8" and backend.file.endswith("model.int8.onnx")
    assert backend.providers == ["CPUExecutionProvider"]


def test_models_sharing_the_cpu_split_its_cores_unless_threads_are_configured(onnx_pii_dir, monkeypatch):
    from sidecar.inference import backends

    monkeypatch.setattr(backends, "usable_cores", lambda: 8)
    assert [backends.cpu_threads(0, share) for share in (1, 2, 3, 16)] == [0, 4, 2, 1]
    assert backends.cpu_threads(3, 2) == 3  # an explicit count is kept
    shared = open_backend(ModelDir.read(onnx_pii_dir), cpu(onnx_pii_dir), cpu_share=2)
    alone = open_backend(ModelDir.read(onnx_pii_dir), cpu(onnx_pii_dir))
    assert (shared.threads, alone.threads) == (4, 0)


class CountingSession:
    """Wraps an ONNX Runtime session and counts the passes it runs."""

    def __init__(self, session):
        self.session, self.passes = session, 0

    def run(self, *args):
        self.passes += 1
        return self.session.run(*args)


def test_small_passes_run_on_a_one_thread_session_and_give_the_same_logits(onnx_pii_dir):
    model_dir = ModelDir.read(onnx_pii_dir)
    config = ModelConfig(path=str(onnx_pii_dir), runtime="onnx", device="cpu", threads=2, small_pass_tokens=8)
    backend = open_backend(model_dir, config)
    assert backend.small_pass_tokens == 8
    pooled = open_backend(model_dir, config.model_copy(update={"small_pass_tokens": 0}))
    assert pooled.small_pass_tokens == 0
    backend._session, backend._small = CountingSession(backend._session), CountingSession(backend._small)
    small = batch([1, 40, 41, 2], [1, 50, 2])  # 2 x 4 = 8 padded tokens
    large = batch([1, 40, 41, 42, 2], [1, 50, 2])  # 2 x 5 = 10
    for ids, mask in (small, large):
        np.testing.assert_allclose(backend.run(ids, mask), pooled.run(ids, mask), rtol=1e-5, atol=1e-5)
    assert (backend._small.passes, backend._session.passes) == (1, 1)


def test_no_one_thread_session_when_the_model_has_one_thread_anyway(onnx_pii_dir, monkeypatch):
    from sidecar.inference import backends

    model_dir = ModelDir.read(onnx_pii_dir)
    one = open_backend(model_dir, ModelConfig(path=str(onnx_pii_dir), runtime="onnx", device="cpu", threads=1))
    monkeypatch.setattr(backends, "usable_cores", lambda: 1)
    single_core = open_backend(model_dir, cpu(onnx_pii_dir, "onnx"))
    assert one.small_pass_tokens == single_core.small_pass_tokens == 0


def test_auto_on_cpu_takes_fp32_onnx_without_an_int8_file(onnx_pii_dir):
    backend = open_backend(ModelDir.read(onnx_pii_dir), cpu(onnx_pii_dir))
    assert backend.name == "onnx" and backend.file.endswith("model.onnx")


def test_explicit_torch_is_honoured_next_to_onnx_files(onnx_pii_dir):
    assert open_backend(ModelDir.read(onnx_pii_dir), cpu(onnx_pii_dir, "torch")).name == "torch"


def test_onnx_backend_matches_pytorch_logits(onnx_pii_dir):
    model_dir = ModelDir.read(onnx_pii_dir)
    ids, mask = batch([1, 40, 41, 42, 2], [1, 50, 2])
    onnx = open_backend(model_dir, cpu(onnx_pii_dir, "onnx")).run(ids, mask)
    torch = open_backend(model_dir, cpu(onnx_pii_dir, "torch")).run(ids, mask)
    real = mask.astype(bool)
    assert onnx.dtype == np.float32
    assert np.allclose(onnx[real], torch[real], atol=1e-4)


@pytest.mark.parametrize(("runtime", "missing"), [("onnx", "model.onnx"), ("onnx-int8", "model.int8.onnx")])
def test_explicit_onnx_runtime_without_its_file_names_the_file(tiny_pii_dir, runtime, missing):
    with pytest.raises(ModelLoadError, match=f"{missing}: runtime '{runtime}' needs this file"):
        open_backend(ModelDir.read(tiny_pii_dir), cpu(tiny_pii_dir, runtime))


def test_explicit_torch_without_weights_names_the_weights_file(onnx_pii_dir, tmp_path):
    copy = shutil.copytree(onnx_pii_dir, tmp_path / "m")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors: runtime 'torch' needs PyTorch weights"):
        open_backend(ModelDir.read(copy), cpu(copy, "torch"))


def test_a_corrupt_onnx_file_is_a_model_load_error(onnx_pii_dir, tmp_path):
    copy = shutil.copytree(onnx_pii_dir, tmp_path / "m")
    (copy / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelLoadError, match="model.onnx: ONNX Runtime could not load it"):
        open_backend(ModelDir.read(copy), cpu(copy, "onnx"))


def test_corrupt_pytorch_weights_are_a_model_load_error(tiny_pii_dir, tmp_path):
    copy = shutil.copytree(tiny_pii_dir, tmp_path / "m")
    (copy / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="PyTorch could not load the model"):
        open_backend(ModelDir.read(copy), cpu(copy, "torch"))


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_is_a_model_load_error(tiny_pii_dir):
    config = ModelConfig(path=str(tiny_pii_dir), device="cuda")
    with pytest.raises(ModelLoadError, match="device 'cuda' was asked for but no CUDA device was found"):
        open_backend(ModelDir.read(tiny_pii_dir), config)


@pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA device")
def test_auto_on_a_gpu_runs_fp32_onnx_on_the_cuda_provider(onnx_pii_dir):
    config = ModelConfig(path=str(onnx_pii_dir))
    backend = open_backend(ModelDir.read(onnx_pii_dir), config)
    assert backend.name == "onnx" and backend.providers[0] == "CUDAExecutionProvider"


def test_an_onnx_pass_asked_to_stop_raises_inference_cancelled_and_the_session_keeps_serving(onnx_pii_dir):
    backend = open_backend(ModelDir.read(onnx_pii_dir), cpu(onnx_pii_dir, "onnx"))
    assert backend.stoppable
    ids, mask = batch([1, 40, 41, 42, 2], [1, 50, 2])
    stop = StopToken()
    stop.stop()  # ONNX Runtime reads the flag between operators; set before the pass, it stops at once
    with pytest.raises(InferenceCancelled, match="stopped"):
        backend.run(ids, mask, stop)
    np.testing.assert_array_equal(backend.run(ids, mask, StopToken()), backend.run(ids, mask))


def test_a_stop_token_runs_its_hooks_once_whenever_they_were_added():
    stop, seen = StopToken(), []
    stop.on_stop(lambda: seen.append("before"))
    stop.stop()
    stop.on_stop(lambda: seen.append("after"))
    stop.stop()
    assert seen == ["before", "after"] and stop.stopped


def test_onnx_sessions_do_not_keep_a_growing_cpu_arena():
    assert not session_options().enable_cpu_mem_arena


def test_freed_heap_memory_goes_back_to_the_os_only_once_the_process_has_grown():
    from sidecar.inference import backends

    if backends._malloc_trim() is None or backends._rss_bytes() is None:
        pytest.skip("needs glibc and /proc")
    assert release_freed_memory(slack=0)  # grown by at least nothing: trimmed
    assert not release_freed_memory(slack=1 << 40)
