"""The scratch buffers large-M linear ops decode into: one per host thread, never shared."""

import torch

import qft


def test_threads_never_share_a_scratch_buffer():
    import threading

    from qft.ops import scratch

    mine = scratch.buffer(torch.device("cpu"), torch.float32, 100)
    assert scratch.buffer(torch.device("cpu"), torch.float32, 50).data_ptr() == mine.data_ptr()  # reused
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch.buffer(torch.device("cpu"), torch.float32, 100)))
    thread.start()
    thread.join()
    assert theirs[0].data_ptr() != mine.data_ptr()


def test_two_threads_running_large_m_layers_get_their_own_weights(monkeypatch):
    import threading
    import time

    from qft import ops
    from qft.ops import backend_reference, backend_triton

    # The decode into scratch, slowed so that the two threads interleave between decode and GEMM (the
    # Triton interpreter itself cannot run in two threads at once, so the reference decode stands in).
    def slow_decode(weight, dtype, out=None):
        backend_reference.dequantize(weight, dtype, out)
        time.sleep(0.02)
        return out

    monkeypatch.setattr(backend_triton, "dequantize", slow_decode)
    torch.manual_seed(0)
    layers = [qft.quantize(torch.randn(48, 64)) for _ in range(2)]
    x = torch.randn(40, 64)  # M above the fused kernel's limit: decode into scratch, then the GEMM
    want = [x @ qt.dequantize(torch.float32).t() for qt in layers]
    barrier, errors = threading.Barrier(2), []

    def run(i):
        try:
            with ops.use_backend("triton"):  # a path that decodes into scratch (the reference path does not)
                barrier.wait()
                for _ in range(3):
                    assert torch.equal(qft.functional.quant_linear(x, layers[i]), want[i])
        except Exception as exc:  # reported below: a thread's assertion does not fail the test by itself
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
