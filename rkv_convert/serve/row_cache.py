"""A packed rkv cache whose rows run independent schedules: continuous batching over the 2-bit store.

:class:`~rkv_convert.runtime.cache.RkvCache` appends every sequence of a batch in lockstep: one
slot per token for every row, one flush schedule counted in shared slots. A request that joined a
running batch there would have its window flushed (its tokens quantized) at other steps than
when it runs alone, and its prefill would push padding into every other row.

:class:`RowCache` keeps the same tensors (same layout, same kernels) but counts per row: row
``r`` holds ``n_quant[r]`` store slots, ``n_window[r]`` window slots and its own sink slots,
exactly the counts of that request run alone through :func:`~rkv_convert.runtime.generate.stream_generate`.

- **Prefill** runs for one request alone, in a batch-1 :class:`RkvCache` (the stock path), and
  :meth:`RowCache.load_row` copies its state into a free row: the same store, window and sinks.
- **Decode** (one token per active row) writes each row's token at its own window slot; a row
  whose window reaches ``recent_window + flush_block`` flushes its oldest ``flush_block`` tokens
  to its own store offset, on the step it would alone. The kernels read ``[:active]`` rows and
  the longest row's slots; a shorter row's extra slots have position -1 (zero attention weight),
  as padding always has.
- **Active rows are ``0 .. active-1``**: a finished row is replaced by the last active one
  (:meth:`RowCache.move_row`), so the decode batch is a contiguous slice of the storage.

All layers share one schedule (:class:`RowState`): the engine calls :meth:`RowCache.begin_step`
before a decode forward and :meth:`RowCache.end_step` after it.

**Static steps** (``begin_step(bound=...)``, what :mod:`.row_graph` captures in a CUDA graph): the
forward runs over ``bound >= active`` rows, a bucket, so that one graph serves every active count up
to it. Rows ``active .. bound-1`` are padding: empty rows (every position -1) whose token lands in
the scratch slot and is never kept (a row is overwritten whole when a request is loaded into it).
Each row's window slot comes from a persistent device buffer (``RowState.slot_buf``), the kernels
read the whole allocated store (whole 128-slot blocks; slots past a row's own have position -1) and
the whole full-precision segment, and :meth:`RowCache.flush` quantizes full windows after the
forward instead of inside it. Every storage tensor keeps its address until the store grows
(``RowState.version`` counts the growths: a graph captured before one is stale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.cache import _STORAGE, CacheSettings, RkvCache, RkvCacheLayer, _grow, store_capacity
from ..runtime.layer_codec import LayerCodec

__all__ = ["RowState", "RowCache", "RowCacheLayer", "row_bytes", "row_counts"]

_STORE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


@dataclass
class RowState:
    """Per-row slot counts on the host (the truth), plus the current step's device index."""

    n_quant: list[int]
    n_window: list[int]
    length: list[int]  # slots each row has received (its tokens so far)
    active: int = 0
    bound: int = 0  # rows this step's forward runs over: ``active``, or a static step's bucket (padding rows past active)
    static: bool = False  # this step is static (fixed shapes, see the module docstring)
    version: int = 0  # bumped when the store's tensors are replaced (grown)
    slot_buf: torch.Tensor | None = None  # int64 [rows], persistent: static steps' window slots
    window_slot: torch.Tensor | None = None  # int64 [bound]: where this step's token goes in the fp segment
    flushing: list[int] = field(default_factory=list)  # rows whose window flushes at the end of this step
    flush_rows: torch.Tensor | None = None  # int64 [k]: the flushing rows
    flush_slots: torch.Tensor | None = None  # int64 [k, flush_block]: the store slots each one's block goes to


class RowCacheLayer(RkvCacheLayer):
    """One decoder layer of a :class:`RowCache` (see the module docstring)."""

    def __init__(self, codec: LayerCodec, settings: CacheSettings, backend: str, rope: tuple[torch.Tensor, float],
                 state: RowState) -> None:  # fmt: skip
        super().__init__(codec, settings, backend, rope)
        self.state = state
        self.base: dict[str, torch.Tensor] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}  # rows -> views of ``base``: dropped when base changes

    def allocate_rows(self, rows: int, slots: int, dtype: torch.dtype) -> None:
        """Storage for ``rows`` sequences of ``slots`` store slots each, on the codec's device."""
        self.capacity_hint = slots
        self.allocate(rows, self.codec.device, dtype)
        self.base = {name: getattr(self, name) for name in _STORAGE}
        self._views = {}
        self.bind(0, row_counts(self.state, 0))

    def bind(self, rows: int, counts: tuple[int, int, int]) -> None:
        """Point the storage attributes at rows ``0 .. rows-1`` (views, made once per row count and store) for
        the next forward; ``counts``: :func:`row_counts` of those rows, the same for every layer."""
        st = self.state
        views = self._views.get(rows)
        if views is None:
            views = self._views[rows] = {name: t[:rows] for name, t in self.base.items()}
        for name, t in views.items():
            setattr(self, name, t)
        self.batch = rows
        self.n_quant, self.n_window, self.length = counts
        if st.static:  # a static step is a decode step, padding rows only included: never the handler's prefill (length 0)
            self.length = max(self.length, 1)
        self.static_slots = self.store_slots() if st.static else 0

    @property
    def static(self) -> bool:
        """This step is static (:meth:`RowCache.begin_step` with a bound): the caller flushes."""
        return self.state.static

    def store_slots(self) -> int:
        return self.base["pos"].shape[1]

    def grow_slots(self, slots: int) -> bool:
        """Make every row's store hold ``slots`` slots, in whole blocks (copies the used part); True if it grew."""
        cap = self.store_slots()
        if slots <= cap:
            return False
        used, slots = max(self.state.n_quant, default=0), store_capacity(slots)
        for name in _STORE:
            self.base[name] = _grow(self.base[name], used, slots, dim=2)
        self.base["pos"] = _grow(self.base["pos"], used, slots, dim=1, fill=-1)
        self._views = {}
        return True

    # ----- rows ------------------------------------------------------------------------------
    def load_row(self, row: int, single: RkvCacheLayer) -> None:
        """Copy the state of ``single`` (a batch-1 layer, just prefilled) into ``row``."""
        b, nq = self.base, single.n_quant
        for name in _STORE:
            b[name][row, :, :nq] = getattr(single, name)[0, :, :nq]
        b["pos"][row] = -1
        b["pos"][row, :nq] = single.pos[0, :nq]
        for name in ("fp_k", "fp_v", "fp_pos", "n_sinks"):
            b[name][row] = getattr(single, name)[0]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` onto row ``dst`` (the slots ``src`` uses; the rest of ``dst`` emptied)."""
        b, nq = self.base, self.state.n_quant[src]
        for name in _STORE:
            b[name][dst, :, :nq] = b[name][src, :, :nq]
        b["pos"][dst] = -1
        b["pos"][dst, :nq] = b["pos"][src, :nq]
        for name in ("fp_k", "fp_v", "fp_pos", "n_sinks"):
            b[name][dst] = b[name][src]

    def clear_row(self, row: int) -> None:
        """Mark every slot of ``row`` empty (position -1) and its sink count zero."""
        self.base["pos"][row] = -1
        self.base["fp_pos"][row] = -1
        self.base["n_sinks"][row] = 0

    # ----- the decode step -------------------------------------------------------------------
    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> None:  # fmt: skip
        """Write one token per bound row at that row's own window slot (sinks to its sink slots; a
        padding row's token to the scratch slot)."""
        a, n_kv, t, d = key.shape
        if t != 1 or a != self.state.bound:
            raise ValueError(f"a row cache takes one token for each of the {self.state.bound} rows of the step, "
                             f"got {a} rows of {t}; prefill requests alone and load_row() them")  # fmt: skip
        pos = positions.to(self.device, torch.int32).expand(a, 1)
        if valid is not None:
            pos = torch.where(valid.to(self.device), pos, torch.full_like(pos, -1))
        key, value = key.to(self.fp_dtype), value.to(self.fp_dtype)
        if sinks is not None and self.settings.pinned_slots > 0:
            pos = self._take_sinks(key, value, pos, sinks.to(self.device) & (pos >= 0))
        slot = self.state.window_slot.to(self.device)  # no copy unless the model spans devices
        index = slot[:, None, None, None].expand(a, n_kv, 1, d)
        self.fp_k.scatter_(2, index, key)
        self.fp_v.scatter_(2, index, value)
        self.fp_pos.scatter_(1, slot[:, None], pos)
        self.n_window = max(self.state.n_window[:a]) + 1  # eager steps read the longest row's window
        self.length += 1

    def flush(self) -> int:
        """Quantize the oldest ``flush_block`` window tokens of each row whose window is full, at its own offset.

        All flushing rows hold ``recent_window + flush_block`` window tokens, so one encode takes
        the same window slots of each, and one indexed write puts each row's block at its own offset.
        """
        st = self.state
        if not st.flushing:
            return 0
        w0, fb, keep = self.window_start, self.settings.flush_block, self.settings.recent_window
        rows, slots = st.flush_rows.to(self.device), st.flush_slots.to(self.device)
        entries = self.encode(self.fp_k[rows, :, w0 : w0 + fb], self.fp_v[rows, :, w0 : w0 + fb], self.fp_pos[rows, w0 : w0 + fb])
        for name, t in entries.items():
            if name == "pos":
                self.pos[rows[:, None], slots] = t
            else:  # [rows, heads, fb, X] into [row, :, slot]: the indexed dims come first
                getattr(self, name)[rows[:, None], :, slots] = t.transpose(1, 2)
        for name in ("fp_k", "fp_v"):
            buf = getattr(self, name)
            buf[rows, :, w0 : w0 + keep] = buf[rows, :, w0 + fb : w0 + fb + keep]  # the right side is a gathered copy
        self.fp_pos[rows, w0 : w0 + keep] = self.fp_pos[rows, w0 + fb : w0 + fb + keep]
        self.fp_pos[:, w0 + keep :].index_fill_(0, rows, -1)  # not fp_pos[rows, ...] = -1: its scalar is copied to the device, a sync
        return fb * len(st.flushing)

    def bytes_used(self) -> int:
        """Bytes holding the active rows' tokens (store slots, sink slots, window)."""
        if not self.base:
            return 0
        quant, fp = self._slot_bytes()
        st = self.state
        return sum(st.n_quant[r] * quant + (self.window_start + st.n_window[r]) * fp for r in range(st.active))


def row_counts(state: RowState, rows: int) -> tuple[int, int, int]:
    """The most store slots, window slots and tokens among rows ``0 .. rows-1``: what a forward over them reads."""
    return (max(state.n_quant[:rows], default=0), max(state.n_window[:rows], default=0),
            max(state.length[:rows], default=0))  # fmt: skip


def row_bytes(codec: LayerCodec, settings: CacheSettings, dtype: torch.dtype, slots: int) -> int:
    """Bytes one row of one layer allocates for ``slots`` store slots plus its full-precision segment."""
    probe = RkvCacheLayer(codec, settings)
    probe.fp_dtype = dtype
    quant, fp = probe._slot_bytes()
    return slots * quant + (probe.window_start + settings.recent_window + settings.flush_block) * fp + 8


class RowCache(RkvCache):
    """An :class:`RkvCache` of :class:`RowCacheLayer` over ``rows`` rows with per-row schedules."""

    def __init__(self, base: RkvCache, rows: int, slots: int, dtype: torch.dtype) -> None:
        super().__init__([layer.codec for layer in base.layers], base.settings, base.inv_freq, base.attention_scaling,
                         base.backend)  # fmt: skip
        self.state = RowState([0] * rows, [0] * rows, [0] * rows)
        self.layers = [RowCacheLayer(layer.codec, self.settings, self.backend, layer.rope, self.state) for layer in base.layers]
        for mine, theirs in zip(self.layers, base.layers, strict=True):
            mine.window = theirs.window  # a sliding layer (the decode-graph check and single() read it)
        self.rows, self.dtype = rows, dtype
        for layer in self.layers:
            layer.allocate_rows(rows, slots, dtype)
        device = self.layers[0].codec.device
        self.state.slot_buf = torch.zeros(rows, dtype=torch.int64, device=device)
        self._slot_host = torch.zeros(rows, dtype=torch.int64, pin_memory=device.type == "cuda")

    @property
    def active(self) -> int:
        return self.state.active

    def single(self, reserve_tokens: int) -> RkvCache:
        """An empty batch-1 :class:`RkvCache` with this cache's codecs and RoPE (to prefill one request alone).

        The same layers ``RkvModel.new_cache`` makes, without re-reading the checkpoint per request.
        """
        cache = RkvCache([layer.codec for layer in self.layers], self.settings, self.inv_freq, self.attention_scaling,
                         self.backend)  # fmt: skip
        for mine, ours in zip(cache.layers, self.layers, strict=True):
            mine.rope, mine.window = ours.rope, ours.window
        return cache.reserve(reserve_tokens)

    def store_slots(self) -> int:
        return self.layers[0].store_slots()

    def grow_slots(self, slots: int) -> None:
        grew = [layer.grow_slots(slots) for layer in self.layers]
        if any(grew):
            self.state.version += 1

    def load_row(self, row: int, single: RkvCache) -> None:
        """Copy a prefilled batch-1 cache into ``row`` (which becomes active if it is the next free one)."""
        first = single.layers[0]
        if first.batch != 1:
            raise ValueError(f"load_row() takes a batch-1 cache, got {first.batch} rows")
        if row != self.state.active:
            raise ValueError(f"the next row to load is {self.state.active}, not {row}")
        self.grow_slots(first.n_quant)
        for mine, theirs in zip(self.layers, single.layers, strict=True):
            if (theirs.length, theirs.n_quant, theirs.n_window) != (first.length, first.n_quant, first.n_window):
                raise ValueError("the prefilled cache's layers hold different slot counts")
            mine.load_row(row, theirs)
        st = self.state
        st.n_quant[row], st.n_window[row], st.length[row] = first.n_quant, first.n_window, first.length
        st.active += 1

    def release_row(self, row: int) -> int | None:
        """Free ``row``; the last active row moves into it. Returns the row that moved there (or None)."""
        st = self.state
        if not 0 <= row < st.active:
            raise ValueError(f"row {row} is not active (rows 0..{st.active - 1} are)")
        last = st.active - 1
        for layer in self.layers:
            if row != last:
                layer.move_row(last, row)
            layer.clear_row(last)
        for counts in (st.n_quant, st.n_window, st.length):
            counts[row] = counts[last]
            counts[last] = 0
        st.active = last
        return last if row != last else None

    def begin_step(self, bound: int | None = None) -> None:
        """Before a decode forward: each row's window slot, which rows flush, views of the step's rows.

        ``bound`` (at least ``active``, at most ``rows``) makes the step static over that many rows
        (module docstring); ``None`` runs the active rows with their used slots."""
        st, s = self.state, self.settings
        a = st.active
        if bound is not None and not a <= bound <= self.rows:
            raise ValueError(f"a static step runs {a} active rows in a bound of {a} to {self.rows} rows, got {bound}")
        need = max((st.n_quant[r] + s.flush_block for r in range(a)), default=0)
        self.grow_slots(need)
        first = self.layers[0]
        w0, device = first.window_start, first.codec.device
        slots = [w0 + st.n_window[r] for r in range(a)]
        st.static, st.bound = bound is not None, a if bound is None else bound
        if st.static:
            host = self._slot_host
            host[:a] = torch.tensor(slots, dtype=torch.int64)
            host[a : st.bound] = first.scratch_slot  # padding rows write where nothing is kept
            st.slot_buf[: st.bound].copy_(host[: st.bound], non_blocking=True)
            st.window_slot = st.slot_buf[: st.bound]
        else:
            st.window_slot = torch.tensor(slots, dtype=torch.int64, device=device)
        st.flushing = [r for r in range(a) if st.n_window[r] + 1 >= s.recent_window + s.flush_block]
        if any(st.n_window[r] + 1 != s.recent_window + s.flush_block for r in st.flushing):
            raise RuntimeError("a row's window outgrew recent_window + flush_block: its schedule was broken")
        device = self.layers[0].codec.device
        st.flush_rows = torch.tensor(st.flushing, dtype=torch.int64, device=device)
        st.flush_slots = torch.tensor([[st.n_quant[r] + j for j in range(s.flush_block)] for r in st.flushing],
                                      dtype=torch.int64, device=device).reshape(-1, s.flush_block)  # fmt: skip
        counts = row_counts(st, st.bound)
        for layer in self.layers:
            layer.bind(st.bound, counts)

    def flush(self) -> None:
        """After a static step's forward: quantize the full windows (the attention handler did not)."""
        if self.state.static:
            for layer in self.layers:
                layer.flush()

    def end_step(self) -> None:
        """After a decode forward: every active row received one token; flushed rows moved a block to the store."""
        st, fb = self.state, self.settings.flush_block
        for r in range(st.active):
            st.n_window[r] += 1
            st.length[r] += 1
        for r in st.flushing:
            st.n_window[r] -= fb
            st.n_quant[r] += fb
        st.flushing = []
        st.static = False

    def layers_written(self) -> list[int]:
        """Per layer, how many tokens its last forward appended beyond the rows' counts (1 when it wrote the step)."""
        base = max(self.state.length[: self.state.active], default=0)
        return [layer.length - base for layer in self.layers]
