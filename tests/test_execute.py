"""The streaming executor: failures in any stage stop it cleanly, leave nothing, and never hang."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import listing, seeded
from safetensors.torch import save_file

from lorasurgeon.commands.merge.compute import compute_merge
from lorasurgeon.commands.merge.ops import TensorOp
from lorasurgeon.engine.execute import run
from lorasurgeon.engine.plan import Ref
from lorasurgeon.errors import CorruptCheckpointError
from lorasurgeon.io import CheckpointWriter, open_checkpoint, plan_shards
from lorasurgeon.io.buffers import ReadBuffers


def copy_ops(ckpt):
    return [TensorOp(i.name, Ref(0, i.name), i.dtype, i.shape, "copy") for i in ckpt.infos()]


def make(tmp_path, n=12):
    src = tmp_path / "src"
    src.mkdir()
    save_file({f"t{i:02d}": torch.full((256, 256), float(i)) for i in range(n)}, src / "model.safetensors")
    return open_checkpoint(src)


def test_streams_every_tensor_in_order(tmp_path):
    ckpt = make(tmp_path)
    ops = copy_ops(ckpt)
    seen = []

    class Count:
        def start(self, total):
            seen.append(total)

        def advance(self, n):
            seen.append(n)

        def finish(self):
            seen.append("done")

    with CheckpointWriter(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
        stats = run(ops, [ckpt], w, compute=compute_merge, progress=Count())
    assert stats.tensors == 12 and stats.bytes_written == 12 * 256 * 256 * 4
    assert seen[0] == stats.bytes_written and seen[-1] == "done" and sum(seen[1:-1]) == stats.bytes_written
    assert stats.infos == ()  # byte copies go file to file: none was computed
    out = open_checkpoint(tmp_path / "out")
    assert all(torch.equal(out.read(n), ckpt.read(n)) for n in ckpt)


def test_a_read_failure_midway_aborts_cleanly(tmp_path):
    ckpt = make(tmp_path)
    ops = copy_ops(ckpt)
    os.truncate(tmp_path / "src" / "model.safetensors", 200_000)  # the file changed after planning
    with pytest.raises(CorruptCheckpointError, match="truncated while reading"):
        with CheckpointWriter(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
            run(ops, [ckpt], w, compute=compute_merge)
    assert listing(tmp_path) == {"src", "src/model.safetensors"}


def test_a_write_failure_midway_aborts_cleanly(tmp_path):
    ckpt = make(tmp_path)
    ops = copy_ops(ckpt)

    class Failing(CheckpointWriter):
        def write(self, name, tensor):
            if name == "t05":
                raise OSError(28, "No space left on device")
            super().write(name, tensor)

    with pytest.raises(OSError, match="No space"):
        with Failing(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
            run(ops, [ckpt], w, compute=compute_merge)
    assert listing(tmp_path) == {"src", "src/model.safetensors"}


def test_read_buffers_are_reused_only_when_nothing_holds_them():
    pool = ReadBuffers(slots=2, min_bytes=0)
    a = pool(1000)
    first = a.data_ptr()
    b = pool(1000)
    assert b.data_ptr() != first  # a is still held
    view = a.view(torch.int16)[:3]
    del a
    c = pool(1000)  # a's memory is still viewed and both slots are taken: fresh, unpooled memory
    assert c.data_ptr() not in (first, b.data_ptr())
    del view
    assert pool(800).data_ptr() == first  # nothing holds it any more: reused


def test_merge_through_reused_buffers_gives_each_tensor_its_own_result(tmp_path):
    # Tensors above the pool's 1 MiB threshold, each with its own values: a buffer reused while
    # a tensor still lived in it would put one layer's numbers into another's.
    from lorasurgeon import merge
    from lorasurgeon.ops.lora import LAYER_KINDS, add_lora

    n, rows, cols, r = 10, 1024, 640, 4
    base = {
        f"model.layers.{i}.mlp.up_proj.weight": seeded((rows, cols), seed=i).to(torch.bfloat16) + i for i in range(n)
    }
    lora = {}
    for i in range(n):
        m = f"base_model.model.model.layers.{i}.mlp.up_proj"
        lora[m + ".lora_A.weight"], lora[m + ".lora_B.weight"] = (
            seeded((r, cols), seed=100 + i),
            seeded((rows, r), seed=200 + i),
        )
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file(lora, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"]}'
    )
    merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")
    out = open_checkpoint(tmp_path / "out")
    for i, (name, w) in enumerate(base.items()):
        m = f"base_model.model.model.layers.{i}.mlp.up_proj"
        expect = add_lora(w.float(), lora[m + ".lora_A.weight"], lora[m + ".lora_B.weight"], 2.0, LAYER_KINDS["linear"])
        got = out.read(name).float()
        assert (got - expect).abs().max() <= expect.abs().max() * 2**-7  # within one bf16 unit


@pytest.mark.parametrize("read_ahead,most", [(1, 1), (None, 3)])
def test_read_ahead_is_bounded_in_bytes(tmp_path, read_ahead, most):
    """How far ahead of compute does the reader get? Each compute waits until the reader has fetched as
    far as it may (that timeout is reached only if it cannot), then gives it a moment to fetch one more
    (which a correct reader never does, so passing depends on no timing), then counts what it fetched
    beyond the op in hand: a reader past its bound shows a larger lead, one short of it a smaller one."""
    import threading

    from lorasurgeon.engine.execute import READ_AHEAD_BYTES, Outcome

    src = tmp_path / "src"
    src.mkdir()
    save_file({f"t{i:02d}": torch.full((512, 512), float(i)) for i in range(8)}, src / "model.safetensors")
    ckpt = open_checkpoint(src)
    reads: list[str] = []
    lead: list[int] = []
    fetched = threading.Condition()

    class Counting:
        def info(self, name):
            return ckpt.info(name)

        def read(self, name, alloc=None):
            t = ckpt.read(name, alloc)
            with fetched:
                reads.append(name)
                fetched.notify_all()
            return t

    # a dtype change: the tensors are read, not copied file to file
    ops = [TensorOp(i.name, Ref(0, i.name), torch.bfloat16, i.shape, "copy") for i in ckpt.infos()]

    def waiting(op, tensors, device):
        in_hand = len(lead) + 1  # ops fetched up to and including this one
        target = min(in_hand + most, len(ops))
        with fetched:
            fetched.wait_for(lambda: len(reads) >= target, timeout=30)
            if target < len(ops):  # room for a reader past its bound to show itself (a correct one never does)
                fetched.wait_for(lambda: len(reads) > target, timeout=0.05)
            lead.append(len(reads) - in_hand)
        return Outcome([(op.name, tensors[op.src].to(op.dtype))], None)

    with CheckpointWriter(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
        run(ops, [Counting()], w, compute=waiting, read_ahead=read_ahead or READ_AHEAD_BYTES)
    # one op ahead under a tiny byte budget; the queue's depth (+1 in hand) otherwise
    assert lead[: len(ops) - most] == [most] * (len(ops) - most)
    assert lead[len(ops) - most :] == list(range(most - 1, -1, -1))  # the last ones: nothing left to read


def test_an_unreadable_tensor_is_reported_and_the_run_goes_on_when_asked(tmp_path):
    """verify's contract with the engine: with ``unreadable``, one tensor that cannot be read is reported
    and the others are still computed; without it, the run stops."""
    from lorasurgeon.engine.execute import Discard, Outcome

    ckpt = make(tmp_path, n=4)

    class OneBadTensor:  # an input whose third tensor cannot be read (a file changed while in use)
        def info(self, name):
            return ckpt.info(name)

        def read(self, name, alloc=None):
            if name == "t02":
                raise CorruptCheckpointError(f"{name}: truncated while reading")
            return ckpt.read(name, alloc)

    ops = [TensorOp(i.name, Ref(0, i.name), torch.float16, i.shape, "copy") for i in ckpt.infos()]  # read, not copied
    stats = run(
        ops,
        [OneBadTensor()],
        Discard(),
        compute=lambda op, t, d: Outcome([], f"ok {op.name}"),
        unreadable=lambda op, exc: f"unreadable {op.name}: {exc}",
    )
    assert stats.infos == ("ok t00", "ok t01", "unreadable t02: t02: truncated while reading", "ok t03")
    with pytest.raises(CorruptCheckpointError, match="t02"):
        run(ops, [OneBadTensor()], Discard(), compute=lambda op, t, d: Outcome([], None))


@pytest.mark.parametrize("workers", [2, 3])
def test_several_workers_write_in_plan_order_with_few_results_waiting(tmp_path, workers):
    """Ops computed at once on several threads, slow and fast ones mixed: the sink sees plan order, the
    reports come in plan order, and results waiting for their turn never pass the bound."""
    import threading
    import time

    from lorasurgeon.engine.execute import Outcome

    ckpt = make(tmp_path)
    # written in another dtype: computed, not copied file to file
    ops = [TensorOp(i.name, Ref(0, i.name), torch.bfloat16, i.shape, "merge") for i in ckpt.infos()]
    lock, alive, most = threading.Lock(), [0], [0]

    def compute(op, tensors, device):
        time.sleep(0.03 if int(op.name[1:]) % 3 == 0 else 0.001)  # every third op slow
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])
        return Outcome([(op.name, (tensors[op.src] + 1).to(torch.bfloat16))], op.name)

    class Sink:
        order: list[str] = []

        def write(self, name, tensor):
            with lock:
                alive[0] -= 1
            Sink.order.append(name)
            assert torch.equal(tensor, (ckpt.read(name) + 1).to(torch.bfloat16))

    stats = run(ops, [ckpt], Sink(), compute=compute, workers=workers, threads=1)
    assert Sink.order == [o.name for o in ops] and list(stats.infos) == [o.name for o in ops]
    assert most[0] <= 2 * workers + 3  # waiting ≤ workers + 1, computing ≤ workers, the write queue 2


def test_a_worker_failure_stops_the_run_and_puts_torch_back(tmp_path):
    from lorasurgeon.engine.execute import Outcome

    ckpt = make(tmp_path)
    ops = [TensorOp(i.name, Ref(0, i.name), torch.bfloat16, i.shape, "merge") for i in ckpt.infos()]
    before = torch.get_num_threads()

    def compute(op, tensors, device):
        if op.name == "t05":
            raise ValueError("boom in a worker")
        return Outcome([(op.name, tensors[op.src].to(torch.bfloat16))], None)

    with pytest.raises(ValueError, match="boom in a worker"):
        with CheckpointWriter(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
            run(ops, [ckpt], w, compute=compute, workers=3, threads=1)
    assert torch.get_num_threads() == before
    assert listing(tmp_path) == {"src", "src/model.safetensors"}


def test_a_merge_on_several_workers_is_the_same_bytes(tmp_path):
    from helpers import FIX_ADAPTER, FIX_BASE

    import lorasurgeon as ls

    ls.merge(FIX_BASE, [FIX_ADAPTER], tmp_path / "one", workers=1)
    ls.merge(FIX_BASE, [FIX_ADAPTER], tmp_path / "three", workers=3)
    one, three = tmp_path / "one" / "model.safetensors", tmp_path / "three" / "model.safetensors"
    assert one.read_bytes() == three.read_bytes()


def test_workers_mistakes_are_named(tmp_path):
    from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli

    r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "o", "--workers", "0")
    assert r.exit_code == 2 and "--workers" in r.output
    one_line_error(
        run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "o", "--workers", "2", "--device", "cuda"), "--workers"
    )
    assert not (tmp_path / "o").exists()


def test_each_device_gets_a_worker_and_worker_i_computes_on_device_i_mod_n(tmp_path):
    """--device with several devices: at least one worker on each, worker i on device i mod n (a meta device
    stands in for a second GPU: the compute records where it was sent and computes on the CPU)."""
    import threading

    from lorasurgeon.engine.execute import Outcome

    ckpt = make(tmp_path, n=24)
    ops = [TensorOp(i.name, Ref(0, i.name), torch.bfloat16, i.shape, "merge") for i in ckpt.infos()]
    seen: list[tuple[str, str]] = []

    def compute(op, tensors, device):
        seen.append((threading.current_thread().name, str(device)))
        return Outcome([(op.name, tensors[op.src].to(torch.bfloat16))], None)

    written: list[str] = []

    class Sink:
        def write(self, name, tensor):
            written.append(name)

    run(ops, [ckpt], Sink(), compute=compute, device=["cpu", "meta", "cpu"], workers=1)
    assert written == [o.name for o in ops]
    for thread, device in seen:
        worker = int(thread.rsplit("-", 1)[1])  # lorasurgeon-compute-N: never the calling thread
        assert device == ["cpu", "meta", "cpu"][worker % 3]


@pytest.mark.parametrize(
    ("spec", "devices"),
    [("cpu", ["cpu"]), ("cuda:0,1", ["cuda:0", "cuda:1"]), ("cuda:1, 3", ["cuda:1", "cuda:3"]), ("cuda:2", ["cuda:2"])],
)
def test_device_lists(spec, devices):
    from lorasurgeon.engine.devices import devices_of

    assert devices_of(spec) == devices


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [("cuda:0,0", "each GPU once"), ("cpu,cuda:0", "no CPU beside"), ("tpu", "unknown device"), ("mps", "unsupported")],
)
def test_device_list_mistakes_are_named(tmp_path, spec, phrase):
    from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli

    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "o", "--device", spec), phrase)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_gpus_asked_for_without_one_are_refused_by_name(tmp_path):
    from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli

    for spec in ("cuda", "cuda:0,1"):
        r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "o", "--device", spec)
        one_line_error(r, "torch sees no CUDA GPU")
