"""Block swap: run the transformer with only two of its blocks on the device.

``model.offload = "blocks"``. The 28 blocks of the 12.8B transformer hold 95 % of its
weights; :class:`BlockStreamer` keeps them in host memory (pinned when the device is CUDA,
so copies can run asynchronously) and, while block ``i`` computes, copies block ``i + 1``
to the device on a side CUDA stream. Block ``i``'s device copy is dropped once the GPU is
done with it, before block ``i + 2``'s copy starts, so at most two blocks are on the device
at once (the schedule: :class:`BlockStreamer`). Everything outside ``model.blocks``
(embedders, time and text MLPs, text fusion, last layer) stays resident.

The block modules and their ``nn.Parameter`` objects are never replaced: only the tensor
behind each parameter (``param.data``) and each buffer is swapped between the stored copy
and the device copy, around the block's forward (forward pre/post hooks). So anything that
holds on to the modules keeps working: LoRA runtime adapters (forward hooks on the Linear
modules, :mod:`krea2kit.lora.apply`), quantized layers (their tensors are buffers), and a
merge into the weights between runs (it changes the stored copy). The arithmetic is the
resident model's, on the same tensors' values, so the outputs are bit-identical.

With the device being the CPU (tests, and a stand-in on any machine) every use copies the
block's tensors into fresh ones (``clone``), which exercises the same schedule: copy,
use, free, prefetch of the next block.

Inference only: the swap happens outside autograd's view.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

#: Blocks on the device at once: the one computing and the next one being copied.
RESIDENT_BLOCKS = 2


class _Slot:
    """One parameter or buffer of a block: where it lives and its stored tensor."""

    __slots__ = ("module", "name", "is_param", "stored")

    def __init__(self, module: nn.Module, name: str, is_param: bool, stored: Tensor) -> None:
        self.module, self.name, self.is_param, self.stored = module, name, is_param, stored

    def install(self, tensor: Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


class BlockStreamer:
    """Streams ``model.blocks`` to ``device`` one block ahead; see the module docstring.

    The schedule, per block ``i`` of a forward:

    * before it runs: the compute stream waits for its copy, which is installed;
    * after it runs (its kernels queued; on CUDA the GPU is usually still on an earlier
      block): it retires, an event marking its end; the copy of block ``i - 1`` is dropped
      once that block's end event has passed (the host waits for it, which also keeps the host
      at most a block ahead of the GPU); then block ``i + 1``'s copy starts on the side stream,
      overlapping block ``i``'s compute on the GPU.

    Memory is freed only after the GPU finished with it, and a copy never starts while two
    blocks hold device memory, so two blocks is a hard bound (the caching allocator reuses
    the freed block's memory for the next copy). The last block's copy stays until the next
    forward (or :meth:`release`).

    ``log`` records ``("copy", i)`` when block i's copy starts, ``("use", i)`` when it is
    installed for its forward and ``("free", i)`` when its copy is dropped; ``peak_resident``
    is the most blocks whose copies were alive at once.
    """

    def __init__(self, model: nn.Module, device: str | torch.device, *, keep_log: bool = False) -> None:
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks: list[nn.Module] = list(model.blocks)
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        inside = {id(m) for b in self.blocks for m in b.modules()}
        # Everything outside the blocks goes to the device once.
        for owner in model.modules():
            if id(owner) in inside:
                continue
            for p in owner._parameters.values():
                if p is not None:
                    p.data = p.data.to(self.device)
            for name, b in owner._buffers.items():
                if b is not None:
                    owner._buffers[name] = b.to(self.device)
        self._slots: list[list[_Slot]] = [self._store(block) for block in self.blocks]
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        # Block index -> (device copies, CUDA event or None), in the order they were made.
        self._pending: dict[int, tuple[list[Tensor], Any]] = {}  # being copied; event: copy done
        self._installed: dict[int, list[Tensor]] = {}  # computing
        self._retired: dict[int, tuple[list[Tensor], Any]] = {}  # queued; event: compute done
        self._refs: list[tuple[int, weakref.ref]] = []
        self.keep_log = keep_log
        self.log: list[tuple[str, int]] = []
        self.peak_resident = 0
        self._handles = [model.register_forward_pre_hook(self._start)]
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._before))
            self._handles.append(block.register_forward_hook(self._after))

    # -- storage ---------------------------------------------------------------------------
    def _store(self, block: nn.Module) -> list[_Slot]:
        """Move a block's tensors to host memory (pinned for CUDA) and leave them installed
        there; the module tree is untouched."""
        slots = []
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    slots.append(_Slot(module, name, True, self._host(p.data)))
            for name, b in module._buffers.items():
                if b is not None:
                    slots.append(_Slot(module, name, False, self._host(b)))
        for slot in slots:
            slot.install(slot.stored)
        return slots

    def _host(self, t: Tensor) -> Tensor:
        t = t.detach().to("cpu")
        return t.pin_memory() if self.cuda and not t.is_pinned() else t

    # -- the schedule ------------------------------------------------------------------------
    def _resident(self) -> int:
        return len(self._pending) + len(self._installed) + len(self._retired)

    def _note(self, what: str, i: int) -> None:
        if self.keep_log:
            self.log.append((what, i))
        self.peak_resident = max(self.peak_resident, self._resident())

    def _prefetch(self, i: int) -> None:
        if i >= len(self.blocks) or i in self._pending or i in self._installed:
            return
        if i in self._retired:  # run again right away (a block called on its own): reuse the copy
            copies, _ = self._retired.pop(i)
            self._pending[i] = (copies, None)
            return
        self._make_room()
        stored = [s.stored for s in self._slots[i]]
        if self.cuda:
            # The copy stream reads pinned host memory that never changes during a run and
            # writes memory no queued kernel uses any more (see _drop_oldest_retired).
            with torch.cuda.stream(self._stream):
                copies = [t.to(self.device, non_blocking=True) for t in stored]
                done = torch.cuda.Event()
                done.record(self._stream)
        elif self.device.type == "cpu":
            copies, done = [t.clone() for t in stored], None  # the stand-in device
        else:
            copies, done = [t.to(self.device) for t in stored], None
        self._pending[i] = (copies, done)
        self._refs.extend((i, weakref.ref(c)) for c in copies)
        self._note("copy", i)

    def _make_room(self) -> None:
        """Drop retired copies, oldest first, until a new copy keeps within the bound."""
        while self._retired and self._resident() >= RESIDENT_BLOCKS:
            self._drop_oldest_retired()

    def _drop_oldest_retired(self) -> None:
        i = next(iter(self._retired))
        copies, finished = self._retired.pop(i)
        if finished is not None:
            finished.synchronize()  # the GPU is done with these tensors: their memory may be reused
        del copies
        if self.keep_log:
            self.log.append(("free", i))

    def _start(self, module, args) -> None:
        """Model forward starts: drop what an interrupted call left (a finished call leaves
        only its last block, retired) and fetch block 0 while the embeddings compute."""
        if self._pending or self._installed:
            self.release()
        self._prefetch(0)

    def _before(self, block, args) -> None:
        i = self._index[id(block)]
        if i not in self._pending:
            self._prefetch(i)  # a block run on its own, outside the model's forward
        copies, copied = self._pending.pop(i)
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        for slot, c in zip(self._slots[i], copies):
            slot.install(c)
        self._installed[i] = copies
        self._note("use", i)

    def _after(self, block, args, output) -> None:
        i = self._index[id(block)]
        for slot in self._slots[i]:
            slot.install(slot.stored)
        finished = None
        if self.cuda:
            finished = torch.cuda.Event()
            finished.record(torch.cuda.current_stream(self.device))
        self._retired[i] = (self._installed.pop(i), finished)
        self._make_room()
        self._prefetch(i + 1)

    def release(self) -> None:
        """Drop every device copy (blocks stay in host memory), waiting for the GPU first."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self._stream.synchronize()
        for i in list(self._installed):
            for slot in self._slots[i]:
                slot.install(slot.stored)
            self._retired[i] = (self._installed.pop(i), None)
        for i in list(self._pending):
            self._retired[i] = (self._pending.pop(i)[0], None)
        while self._retired:
            self._drop_oldest_retired()

    def live_copies(self) -> list[int]:
        """Block indices whose device copies are still referenced anywhere (one per tensor)."""
        self._refs = [(i, r) for i, r in self._refs if r() is not None]
        return sorted(i for i, _ in self._refs)

    def remove(self) -> None:
        """Stop streaming: hooks removed, blocks left in host memory."""
        self.release()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def stream_blocks(model: nn.Module, device: str | torch.device, **kwargs) -> BlockStreamer:
    """Attach a :class:`BlockStreamer` to ``model`` (kept as ``model.block_streamer``)."""
    streamer = BlockStreamer(model, device, **kwargs)
    model.block_streamer = streamer
    return streamer
