"""FixedBatch: one batch shape for the network, the same results as calling it directly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from musetalk_service.nets.fixed_batch import FixedBatch, use_compile_cache
from musetalk_service.nets.musetalk import FaceGenerator


class _Affine(nn.Module):
    """Row-wise, so padding rows cannot change the real rows' results; records each batch it sees."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return self.linear(x) * y


def _inputs(rows: int):
    g = torch.Generator().manual_seed(rows)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 3, generator=g)


@pytest.mark.parametrize("rows", [1, 5, 8, 13, 24])
def test_padded_runs_match_direct_calls_and_only_show_the_fixed_batch(rows):
    module = _Affine()
    runner = FixedBatch(module, 8, pad=True)
    x, y = _inputs(rows)
    out = runner(x, y)
    assert set(module.seen) == {8}  # one shape only: the last chunk was padded
    assert len(module.seen) == -(-rows // 8)
    with torch.inference_mode():
        torch.testing.assert_close(out, module.linear(x) * y)


def test_unpadded_runner_passes_the_last_chunk_as_it_is():
    module = _Affine()
    FixedBatch(module, 8)(*_inputs(13))
    assert module.seen == [8, 5]


def test_inputs_must_agree_on_rows_and_not_be_empty():
    runner = FixedBatch(_Affine(), 8)
    x, y = _inputs(4)
    with pytest.raises(ValueError, match="disagree"):
        runner(x, y[:3])
    with pytest.raises(ValueError, match="empty"):
        runner(x[:0], y[:0])
    with pytest.raises(ValueError, match="compile_mode"):
        FixedBatch(_Affine(), 8, "fastest")


def test_compiled_generator_traces_whole_and_matches_eager(tiny_bundle):
    """torch.compile's graph capture (the eager backend: no C++ compiler needed on CPU) takes
    the UNet, the VAE decoder and the pixel conversion as one graph, with the same output."""
    torch._dynamo.reset()
    generator = FaceGenerator(tiny_bundle.unet, tiny_bundle.vae, tiny_bundle.pe)
    # Batch 6 for 6 rows: CPU kernels differ by batch size in the last float bit, which can flip
    # a rounding; the chunking itself is checked above.
    compiled = FixedBatch(generator, 6, "default", backend="eager")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 8, 32, 32, generator=g)
    audio = torch.randn(6, tiny_bundle.token_count, tiny_bundle.audio_dim, generator=g)
    from torch._dynamo.utils import counters

    counters.clear()
    out = compiled(latents, audio)
    with torch.inference_mode():
        expected = generator(latents, audio)
    assert torch.equal(out, expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_a_warmed_runner_never_compiles_again_whatever_the_input_layout():
    """A request's inputs are views (a permuted HWC upload, a flipped channel order); the warm-up
    input is contiguous. The graph compiled at warm-up must serve them all."""
    compiled_for: list[list[tuple[int, ...]]] = []

    def counting_backend(graph, example_inputs):
        compiled_for.append([tuple(t.stride()) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    torch._dynamo.reset()
    conv = nn.Conv2d(3, 4, 3)
    runner = FixedBatch(conv, 4, "default", backend=counting_backend)
    runner.warmup(torch.zeros(1, 3, 8, 8))
    assert len(compiled_for) == 1
    channels_last = torch.randn(6, 8, 8, 3).permute(0, 3, 1, 2)
    for batch in (channels_last, channels_last.flip(1), channels_last[:, :, ::2, ::2].repeat(1, 1, 2, 2)):
        with torch.inference_mode():
            torch.testing.assert_close(runner(batch), conv(batch))
    assert len(compiled_for) == 1, compiled_for
    torch._dynamo.reset()


def test_compile_cache_dir_is_created_and_an_operator_setting_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache(tmp_path / "a") == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache(tmp_path / "b") == tmp_path / "mine"


def test_a_failing_compiler_falls_back_to_eager_at_warmup(caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C compiler here")

    torch._dynamo.reset()
    module = _Affine()
    runner = FixedBatch(module, 8, "default", backend=broken_backend)
    runner.warmup(*_inputs(1))
    assert runner.compile_mode is None and "no C compiler here" in caplog.text
    x, y = _inputs(5)
    module.seen.clear()
    with torch.inference_mode():
        torch.testing.assert_close(runner(x, y), module.linear(x) * y)
    assert module.seen == [5]  # eager: no padding any more
    torch._dynamo.reset()


def test_a_cuda_graph_needs_the_fixed_batch_and_is_not_recorded_off_cuda():
    with pytest.raises(ValueError, match="CUDA graph needs the fixed batch"):
        FixedBatch(_Affine(), 8, cuda_graph=True, pad=False)
    module = _Affine()
    runner = FixedBatch(module, 8, cuda_graph=True)
    runner.warmup(*_inputs(1))
    assert runner.graph is None  # CPU: nothing to record; padded runs as without the graph
    module.seen.clear()
    x, y = _inputs(13)
    with torch.inference_mode():
        torch.testing.assert_close(runner(x, y), module.linear(x) * y)
    assert module.seen == [8, 8]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_cuda_graph_replays_match_the_network_and_own_their_results(compile_mode):
    torch._dynamo.reset()
    module = _Affine().cuda()
    runner = FixedBatch(module, 8, compile_mode, cuda_graph=True)
    runner.warmup(*(t.cuda() for t in _inputs(1)))
    assert runner.graph is not None
    module.seen.clear()
    results = []
    for rows in (13, 8, 3):
        x, y = (t.cuda() for t in _inputs(rows))
        results.append((runner(x, y), x, y))
    if compile_mode is None:
        assert module.seen == []  # replays only: the module's Python never ran again
    for out, x, y in results:  # earlier results survive later replays
        with torch.inference_mode():
            torch.testing.assert_close(out, module.linear(x) * y)
    torch._dynamo.reset()


@cuda
def test_cuda_graph_serves_several_threads_and_streams():
    from concurrent.futures import ThreadPoolExecutor

    module = _Affine().cuda()
    runner = FixedBatch(module, 4, cuda_graph=True)
    runner.warmup(*(t.cuda() for t in _inputs(1)))

    def run(rows: int):
        x, y = (t.cuda() for t in _inputs(rows))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs = [runner(x, y) for _ in range(20)]
        stream.synchronize()
        return outs, x, y

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(run, [3, 5, 9, 12]))
    for outs, x, y in done:
        with torch.inference_mode():
            expected = module.linear(x) * y
        for out in outs:
            torch.testing.assert_close(out, expected)

