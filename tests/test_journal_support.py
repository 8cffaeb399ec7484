"""Helpers for the journal tests (this module holds no tests).

``use_codec`` runs the whole journal package on one codec implementation; ``Model`` is the
reference for replay semantics; ``MiniQueue`` drives a journal the way erq's queue does
(RAM up to a budget, read-behind beyond it).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import erq.journal.codec as codec_selector
from erq.journal import QueueJournal, RecoveredItem
from erq.journal.format import (
    HEADER_SIZE,
    OP_ADD,
    OP_CONFIRM,
    OP_FLUSH,
    OP_OPEN,
    OP_REMOVE,
    OP_UNREMOVE,
)

KiB = 1024
ROOT = Path(__file__).resolve().parent.parent


CODEC_MODULES = codec_selector.MODULES


def codec_module(impl: str) -> SimpleNamespace:
    """Every name of one implementation of the journal codec (``impl``: "c" or "py")."""
    return codec_selector.implementation(impl == "c")


# QueueJournal's class body, to rebuild it over the other AppendCore (the base it got at import
# is the selector's choice then; its __dict__/__weakref__ slots come with the new class). The
# other bases (its mixins) stay.
_JOURNAL_BODY = {
    k: v for k, v in vars(QueueJournal).items() if k not in ("__dict__", "__weakref__")
}
_JOURNAL_CORE, *_JOURNAL_MIXINS = QueueJournal.__bases__
_JOURNAL_CLASSES: dict[type, type] = {_JOURNAL_CORE: QueueJournal}


def journal_class(core: type) -> type[QueueJournal]:
    """QueueJournal over ``core`` (an AppendCore implementation): same body, other base."""
    cls = _JOURNAL_CLASSES.get(core)
    if cls is None:
        bases = (core, *_JOURNAL_MIXINS)
        cls = type(QueueJournal)(QueueJournal.__name__, bases, dict(_JOURNAL_BODY))
        cls.__qualname__ = QueueJournal.__qualname__
        _JOURNAL_CLASSES[core] = cls
    return cls


def use_codec(impl: str, monkeypatch) -> object:
    """Point the codec selector (which every journal module reads at call time) at ``impl``,
    and make ``QueueJournal.open`` return journals whose append path is ``impl``'s AppendCore."""
    module = codec_module(impl)
    for name in codec_selector.__all__:
        monkeypatch.setattr(codec_selector, name, getattr(module, name))
    cls = journal_class(module.AppendCore)
    if cls is not QueueJournal:
        monkeypatch.setattr(QueueJournal, "_open_journal", cls._open_journal)
    return module


def item(id: int, size: int = 20, flags: int = 0) -> RecoveredItem:
    """A deterministic item whose data has no zero byte (so zeroing it always shows)."""
    data = bytes((id * 7 + i) % 255 + 1 for i in range(size))
    return RecoveredItem(id, flags, 1_000_000 + id, 0 if id % 3 else 2_000_000 + id, data)


class Model:
    """The queue state the journal must give back: open reads, then queued items."""

    def __init__(self) -> None:
        self.queued: list[RecoveredItem] = []
        self.open: dict[int, RecoveredItem] = {}
        self.next_id = 1

    def apply(self, op: int, it: RecoveredItem | None = None, id: int = 0) -> None:
        if op == OP_ADD:
            self.queued.append(it)
            self.next_id = max(self.next_id, it.id + 1)
            return
        self.next_id = max(self.next_id, id + 1)
        if op == OP_REMOVE:
            self.queued = [q for q in self.queued if q.id != id]
            self.open.pop(id, None)
        elif op == OP_OPEN:
            for i, q in enumerate(self.queued):
                if q.id == id:
                    self.open[id] = self.queued.pop(i)
                    break
        elif op == OP_CONFIRM:
            self.open.pop(id, None)
        elif op == OP_UNREMOVE:
            if id in self.open:
                self.queued.insert(0, self.open.pop(id))
        elif op == OP_FLUSH:
            self.queued.clear()

    def expected(self) -> list[RecoveredItem]:
        return [*self.open.values(), *self.queued]

    def restarted(self) -> None:
        """After a restart every open read is back at the head, in order."""
        self.queued[:0] = list(self.open.values())
        self.open.clear()


def write_ops(journal: QueueJournal, model: Model, ops: list[tuple]) -> None:
    """Apply ``(opcode, item_or_id)`` pairs to both the journal and the model."""
    for op, arg in ops:
        if op == OP_ADD:
            journal.add(arg.id, arg.flags, arg.add_time, arg.expiry, arg.data)
            model.apply(op, arg)
        elif op == OP_FLUSH:
            journal.flush()
            model.apply(op)
        else:
            {
                OP_REMOVE: journal.remove,
                OP_OPEN: journal.open,
                OP_CONFIRM: journal.confirm,
                OP_UNREMOVE: journal.unremove,
            }[op](arg)
            model.apply(op, id=arg)


def all_items(journal: QueueJournal, recovery) -> list[RecoveredItem]:
    """Everything a recovery gave back: the in-memory items, then the read-behind rest."""
    out = list(recovery.items)
    while journal.disk_items:
        out += journal.read_behind(1 << 20)
    return out


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".seg"))


def delete_journal(queue_dir: Path, what: str) -> None:
    """What an operator or a tmp cleaner does to a live queue: the directory, or its files."""
    if what == "directory":
        shutil.rmtree(queue_dir)
    else:
        for path in segment_files(queue_dir):
            path.unlink()


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record of a segment image, up to the first zero length."""
    spans, pos = [], HEADER_SIZE
    while pos + 4 <= len(data):
        length = struct.unpack_from("<I", data, pos)[0]
        if length == 0:
            break
        spans.append((pos, pos + 8 + length))
        pos += 8 + length
    return spans


def added_ids(path) -> set[int]:
    """The ids of the ADD records in the segment file ``path``."""
    raw = path.read_bytes()
    return {
        struct.unpack_from("<Q", raw, start + 9)[0]
        for start, _ in record_spans(raw)
        if raw[start + 8] == OP_ADD
    }


class MiniQueue:
    """A FIFO over a journal with erq's read-behind rule: items stay in RAM while the
    memory budget allows and nothing is on disk; past it they stay in the journal."""

    def __init__(self, journal: QueueJournal, max_memory: int, recovery=None) -> None:
        self.journal = journal
        self.max_memory = max_memory
        self.ring: list[RecoveredItem] = []
        self.open: dict[int, RecoveredItem] = {}
        self.disk = 0
        if recovery is not None:
            self.ring = list(recovery.items)
            self.disk = recovery.disk_items

    @property
    def mem_bytes(self) -> int:
        return sum(len(it.data) for it in self.ring)

    def add(self, it: RecoveredItem) -> None:
        in_memory = self.disk == 0 and self.mem_bytes + len(it.data) <= self.max_memory
        self.journal.add(it.id, it.flags, it.add_time, it.expiry, it.data, in_memory)
        if in_memory:
            self.ring.append(it)
        else:
            self.disk += 1

    def _head(self) -> RecoveredItem | None:
        if not self.ring and self.disk:
            back = self.journal.read_behind(max(self.max_memory - self.mem_bytes, 1))
            self.disk -= len(back)
            self.ring.extend(back)
        return self.ring[0] if self.ring else None

    def take(self, reliable: bool = False) -> RecoveredItem | None:
        head = self._head()
        if head is None:
            return None
        self.ring.pop(0)
        if reliable:
            self.open[head.id] = head
            self.journal.open(head.id)
        else:
            self.journal.remove(head.id)
        return head

    def confirm(self, id: int) -> None:
        del self.open[id]
        self.journal.confirm(id)

    def abort(self, id: int) -> None:
        self.ring.insert(0, self.open.pop(id))
        self.journal.unremove(id)

    def maybe_compact(self, wait: bool = True) -> bool:
        if self.journal.wants_compaction:
            self.journal.compact(list(self.open.values()), list(self.ring), wait=wait)
            return True
        return False


def copy_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def env_for(impl: str) -> dict:
    env = dict(os.environ)
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def random_step(
    q: MiniQueue,
    model: Model,
    rng,
    next_id: int,
    *,
    add: float,
    take: float,
    reliable: float,
    confirm: float,
    max_size: int,
    force_add: bool = False,
) -> int:
    """One random operation on ``q``, applied to ``model`` too, chosen by one ``rng.random()``
    draw ``r``: an add of 1 to ``max_size - 1`` bytes when ``r < add`` (or ``force_add``), a
    plain take when ``r < take``, a reliable take when ``r < reliable``, else the oldest open
    read is confirmed (``r < confirm``) or aborted. Returns the next unused item id."""
    r = rng.random()
    if r < add or force_add:
        it = item(next_id, size=rng.randrange(1, max_size))
        q.add(it)
        model.apply(OP_ADD, it)
        return next_id + 1
    if r < take:
        got = q.take()
        if got is not None:
            model.apply(OP_REMOVE, id=got.id)
    elif r < reliable:
        got = q.take(reliable=True)
        if got is not None:
            model.apply(OP_OPEN, id=got.id)
    elif q.open:
        oldest = next(iter(q.open))
        if r < confirm:
            q.confirm(oldest)
            model.apply(OP_CONFIRM, id=oldest)
        else:
            q.abort(oldest)
            model.apply(OP_UNREMOVE, id=oldest)
    return next_id


def run_scenario(
    journal: QueueJournal, max_memory: int, seed: int, steps: int
) -> tuple[MiniQueue, Model]:
    """Random adds, plain and reliable reads, confirms and aborts through a MiniQueue, with
    the same operations applied to a Model. Ends with open reads, items in RAM and items
    on disk (read-behind) all present."""
    import random

    rng = random.Random(seed)
    q = MiniQueue(journal, max_memory)
    model = Model()
    next_id = 1
    for step in range(steps):
        next_id = random_step(
            q,
            model,
            rng,
            next_id,
            add=0.55,
            take=0.7,
            reliable=0.85,
            confirm=0.95,
            max_size=500,
            force_add=step > steps - 40,
        )
    while len(q.open) < 3:
        got = q.take(reliable=True)
        model.apply(OP_OPEN, id=got.id)
    assert q.open and q.ring and q.disk
    return q, model
