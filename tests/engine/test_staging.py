"""Host-to-device staging: a buffer is never packed again while an upload that reads it is in flight.

On CPU the guard is exercised with a copy engine whose copies run late, as a CUDA stream's may:
a queued copy reads its host buffer only when a fence after it is waited on (or at the end).
That is the situation of several steps in a row that sample nothing (the host never waits on
the device), which a CPU run otherwise cannot produce.
"""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.engine.model_runner import ModelRunner
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.scheduler import ScheduledSeq
from kubeinfer_serving.engine.sequence import Sequence
from kubeinfer_serving.engine.staging import HostToDevice


class LateCopies:
    """Copies that run only when a fence after them is waited on, or at :meth:`finish` (a slow stream)."""

    def __init__(self) -> None:
        self.queued: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done = 0

    def copy(self, src: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        dst = torch.empty_like(src) if out is None else out
        self.queued.append((src, dst))
        return dst

    def _run_to(self, n: int) -> None:
        while self.done < n:
            src, dst = self.queued[self.done]
            dst.copy_(src)
            self.done += 1

    def new_fence(self):
        copies = self

        class _Fence:
            upto = 0

            def record(self) -> None:
                self.upto = len(copies.queued)

            def synchronize(self) -> None:
                copies._run_to(self.upto)

        return _Fence()

    def finish(self) -> None:
        self._run_to(len(self.queued))


def test_three_uploads_in_a_row_each_deliver_what_was_packed() -> None:
    copies = LateCopies()
    stage = HostToDevice(torch.device("cpu"), initial=8, copies=copies)
    out = []
    for step in range(5):  # no step waits on the device: the host runs ahead of the copies
        buf = stage.host_buffer(8)
        buf[:8] = step
        out.append(stage.upload(buf[:8]))
    copies.finish()
    assert [t.tolist() for t in out] == [[s] * 8 for s in range(5)]
    assert copies.done == 5


def test_uploads_into_a_fixed_device_buffer_are_guarded_too() -> None:
    """The decode graphs' static inputs: every upload lands in the same buffer, in order."""
    copies = LateCopies()
    stage = HostToDevice(torch.device("cpu"), initial=4, copies=copies)
    static = torch.zeros(4, dtype=torch.int64)
    seen = []
    for step in range(4):
        buf = stage.host_buffer(4)
        buf[:4] = step
        stage.upload(buf[:4], out=static)
        if step >= 2:
            # Packing step's buffer waited for step - 2's copy, which therefore has landed.
            seen.append(copies.done >= step - 1)
    copies.finish()
    assert seen == [True, True] and static.tolist() == [3] * 4


def test_prepare_steps_that_sample_nothing_keep_their_inputs(make_engine) -> None:
    """The engine's ModelRunner.prepare through a late copy engine: three 16-token prefill chunks of
    one prompt in a row (nothing sampled, no host sync) each upload their own ids, positions, slots."""
    runner: ModelRunner = make_engine(num_kv_blocks=8).runner
    copies = LateCopies()
    runner._inputs_to_device = HostToDevice(runner.device, initial=16, copies=copies)
    bs = runner.block_size
    seq = Sequence("r", list(range(100, 100 + 3 * bs)), SamplingParams(max_tokens=1))
    seq.block_table = [7, 3, 5]
    steps = [runner.prepare([ScheduledSeq(seq, bs, start)]) for start in (0, bs, 2 * bs)]
    copies.finish()
    for k, inputs in enumerate(steps):
        assert inputs.input_ids.tolist() == list(range(100 + bs * k, 100 + bs * (k + 1)))
        assert inputs.positions.tolist() == list(range(bs * k, bs * (k + 1)))
        assert inputs.meta.slot_mapping.tolist() == [[7, 3, 5][k] * bs + i for i in range(bs)]


def test_on_cpu_without_a_copy_engine_the_inputs_are_the_host_views() -> None:
    stage = HostToDevice(torch.device("cpu"), initial=4)
    buf = stage.host_buffer(4)
    assert stage.upload(buf[:4]).data_ptr() == buf.data_ptr()
    assert stage.host_buffer(4).data_ptr() != buf.data_ptr()  # the other buffer
    assert stage.host_buffer(4).data_ptr() == buf.data_ptr()


@pytest.mark.cuda
def test_on_cuda_many_uploads_without_a_host_sync_arrive_intact() -> None:
    """Real pinned buffers and events: a slow kernel queued first keeps the copies in flight while the
    host packs ahead; every upload still carries its own values."""
    dev = torch.device("cuda")
    stage = HostToDevice(dev, initial=1 << 16)
    big = torch.randn(4096, 4096, device=dev)
    out = []
    for step in range(12):
        for _ in range(3):
            big = big @ big / 64  # device work ahead of the copies
        buf = stage.host_buffer(1 << 16)
        assert buf.is_pinned()
        buf[: 1 << 16] = step
        out.append(stage.upload(buf[: 1 << 16]))
    torch.cuda.synchronize()
    assert [int(t.min()) == int(t.max()) == s for s, t in enumerate(out)] == [True] * 12
