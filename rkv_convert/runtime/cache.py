"""The packed rkv KV cache: a transformers ``Cache`` of append-only quantized layers.

Per layer and sequence the cache holds three kinds of tokens:

- **quantized store** (append only, never re-quantized): keys in the checkpoint's key layout
  (``KeyLayout``): ``prerope`` keys pre-RoPE, centred and rotated per head group; ``folded`` keys
  post-RoPE, centred by ``RoPE_n(mu)`` and rotated per KV head (``y = (k_post - RoPE_n(mu)) @ R_h``,
  the kernel folds ``R_h`` into the query); packed ``bits``-bit codes with a scale and zero per
  group (fp16, or 8-bit codes where the checkpoint's ``group_meta`` is ``log8``: folded layout only); values
  (already rotated by the exported weights) packed per token in groups of consecutive channels;
- **sinks**: up to ``max_sinks`` tokens per sequence flagged online (``sinks.flag_sinks``) kept in
  full precision for the whole generation; further flagged tokens are quantized like any token;
- **salient tokens**: up to ``salient_tokens`` prompt tokens per sequence, those the prompt's last tokens
  attend to most (``salient.salient_flags``, picked at the end of the prefill), kept in full precision
  in the same pinned slots as the sinks (``pinned_slots = max_sinks + salient_tokens``);
- **recent window**: the newest ``recent_window`` to ``recent_window + flush_block - 1`` tokens in
  full precision; whenever it reaches ``recent_window + flush_block`` tokens its oldest
  ``flush_block`` tokens are quantized and appended to the store.

All sequences of a batch append in lockstep (one slot per token); a slot whose token is padding,
or a sink that moved to the full-precision segment, has position ``-1`` for that sequence and gets
zero attention weight. Stored tensors (shapes as the kernels in ``rkv_convert.kernels`` read them):

==============  =======  ============================  =========================================
name            dtype    shape                         meaning
==============  =======  ============================  =========================================
``k_codes``     uint8    ``[B, n_hg, cap, Gd*b/8]``     packed key codes, rotated channel order (folded: y)
``k_scale``     fp16     ``[B, n_hg, cap, Gd/g_k]``     key scale per quantization group (log8: uint8 code)
``k_zero``      fp16     ``[B, n_hg, cap, Gd/g_k]``     key zero (group minimum) per group (log8: int8 code)
``v_codes``     uint8    ``[B, n_kv, cap, d*b/8]``      packed value codes
``v_scale``     fp16     ``[B, n_kv, cap, d/g_v]``      value scale per group (log8: uint8 code)
``v_zero``      fp16     ``[B, n_kv, cap, d/g_v]``      value zero per group (log8: int8 code)
``pos``         int32    ``[B, cap]``                   RoPE position per slot, -1 = empty
``fp_k``        model    ``[B, n_kv, F, d]``            keys of sinks + window (prerope: pre-RoPE, folded: post-RoPE)
``fp_v``        model    ``[B, n_kv, F, d]``            values of sinks + window
``fp_pos``      int32    ``[B, F]``                     position per full-precision slot, -1 = empty
==============  =======  ============================  =========================================

``n_hg = n_kv/G`` head groups of ``Gd = G*d`` channels (folded: ``G = 1``, key groups of consecutive
channels of ``y``); the kernels read them as one :class:`~rkv_convert.kernels.packed_kv.PackedKV`
(:meth:`RkvCacheLayer.packed_kv`); ``cap`` grows geometrically. The
full-precision segment holds ``pinned_slots`` sink and salient slots, one scratch slot (index ``pinned_slots``,
always empty: writes that must go nowhere land there, so no step needs a host sync) and the window.

Sliding-window layers (Gemma 2/3, Mistral, Phi-3): before each step the attention handler hides
(position -1) the slots of tokens that left the layer's window (:meth:`RkvCacheLayer.hide_before`).
Their storage is reclaimed when the store grows: once the store's hidden prefix (the leading slots
every sequence has hidden) is at least half of the used store, the live slots move to the front
(one copy of the used part, amortised O(1) per token; codes are moved, never re-quantized) and
``n_quant`` shrinks. A sliding layer's store stays ``O(window + flush_block)`` slots, not
``O(sequence)``; its up-front allocation is capped likewise (``RkvCacheLayer.window``), and a
store that a prompt longer than the window grew shrinks back at the first reclaim (a prefill does
not hide: its peak is the prompt's store).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..export.format import Checkpoint, RkvConfig
from .layer_codec import LayerCodec
from ..kernels.encode_folded import encode_folded
from ..kernels.packed_kv import PackedKV
from ..kernels.quantize_pack import quantize_pack
from ..models.adapters import adapter_for, attention_modules, decoder_layers, layer_rope
from ..quant.packing import packed_width
from ..quant.quantizer import GroupMeta, GroupRanges

__all__ = ["CacheSettings", "RkvCacheLayer", "RkvCache", "store_capacity"]

_STORE_ALIGN = 128  # store slots come in whole blocks of the folded decode kernel's largest slot block
_MIN_CAPACITY = _STORE_ALIGN  # an empty store still gets one block


@dataclass(frozen=True)
class CacheSettings:
    """How many tokens stay in full precision, and how the window is flushed."""

    recent_window: int = 128
    flush_block: int = 64
    max_sinks: int = 8
    salient_tokens: int = 0

    def __post_init__(self) -> None:
        if self.recent_window < 0 or self.max_sinks < 0 or self.salient_tokens < 0 or self.flush_block <= 0:
            raise ValueError("recent_window, max_sinks and salient_tokens must be >= 0 and flush_block > 0")

    @property
    def pinned_slots(self) -> int:
        """Full-precision slots for tokens kept for the whole generation: sinks and salient tokens."""
        return self.max_sinks + self.salient_tokens

    @classmethod
    def from_config(cls, config: RkvConfig, **overrides: int) -> "CacheSettings":
        base = dict(recent_window=config.recent_window, flush_block=config.flush_block, max_sinks=config.max_sinks,
                    salient_tokens=config.salient_tokens)  # fmt: skip
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


_STORAGE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "pos", "fp_k", "fp_v", "fp_pos", "n_sinks")


def store_capacity(slots: int) -> int:
    """Store capacity rounded up to whole blocks of 128 slots: the folded decode kernel then reads
    whole blocks without bounds masks (``MASKLESS``), and the scale tensors' head and batch strides
    divide by 16 elements, which lets it load whole scale rows asynchronously (Triton specializes on
    it)."""
    return -(-slots // _STORE_ALIGN) * _STORE_ALIGN


@functools.lru_cache(maxsize=64)
def _constant(value: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim constant on ``device``, made once (read only): ``torch.where`` with a Python scalar
    makes and fills a new device tensor on every call. Filled on the device (no host copy), so it
    can first be made while a CUDA graph is being captured."""
    return torch.full((), value, dtype=dtype, device=device)


def _grow(t: torch.Tensor, used: int, capacity: int, dim: int, fill: int = 0) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = capacity
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, used).copy_(t.narrow(dim, 0, used))
    return out


class RkvCacheLayer(CacheLayerMixin):
    """One decoder layer's packed cache (see the module docstring for the layout)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self, codec: LayerCodec, settings: CacheSettings, backend: str = "auto", rope: tuple[torch.Tensor, float] | None = None
    ) -> None:
        super().__init__()
        self.codec = codec
        self.settings = settings
        self.backend = backend
        # (inv_freq fp32 [d/2] on the layer's device, attention_scaling): the model's RoPE, which
        # the folded layout's writes and every layout's stored_tokens() need
        self.rope = None if rope is None else (rope[0].to(codec.device, torch.float32), float(rope[1]))
        self.length = 0  # slots appended (padding included): what transformers calls the sequence length
        self.n_quant = 0  # slots in the quantized store
        self.n_window = 0  # slots in the recent window
        self.fp_dtype: torch.dtype | None = None
        self.capacity_hint = 0  # store slots to allocate up front (e.g. prompt + new tokens)
        self.is_row_view = False  # storage is rows of another layer's tensors (rows())
        self.window: int | None = None  # the layer's sliding window (None: global), caps the store's allocation
        self.hides = False  # hide_before() was called: this layer is a sliding one
        self.reclaimed = 0  # store slots dropped by reclaiming (slots held = length - reclaimed)
        self.window_slot: torch.Tensor | None = None  # static (set_static): int64 [1], the window slot the next token takes
        self.static_slots = 0  # static: store slots the kernels read (set_static)
        self.storage_version = 0  # bumped whenever the storage tensors are replaced (a captured graph is then stale)

    # ----- transformers contract ------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate empty storage for ``key_states``'s batch, device and dtype."""
        b, n_kv, _, d = key_states.shape
        c = self.codec
        if n_kv != c.num_kv_heads or d != c.head_dim:
            raise ValueError(f"keys have {n_kv} heads of {d}, the checkpoint {c.num_kv_heads} heads of {c.head_dim}")
        self.allocate(b, key_states.device, key_states.dtype, whole_hint=False)

    def allocate(self, batch: int, device: torch.device, dtype: torch.dtype, whole_hint: bool = True) -> None:
        """Empty storage for ``batch`` sequences; the store starts at ``capacity_hint`` slots (or 64).

        ``whole_hint=False`` (a first write): a sliding layer starts at :meth:`store_hint` instead.
        An explicit allocation takes the whole hint: :meth:`rows` views cannot grow.
        """
        c, b, d, n_kv, dev = self.codec, batch, self.codec.head_dim, self.codec.num_kv_heads, device
        self.device, self.fp_dtype, self.batch = dev, dtype, b
        self.length = self.n_quant = self.n_window = self.reclaimed = 0
        n_hg, gd = c.num_head_groups, c.group_channels
        cap = store_capacity(max(_MIN_CAPACITY, self.capacity_hint if whole_hint else self.store_hint()))
        u8, (s_dt, z_dt) = torch.uint8, c.meta.dtypes
        self.k_codes = torch.zeros(b, n_hg, cap, packed_width(gd, c.key_bits), dtype=u8, device=dev)
        self.k_scale = torch.zeros(b, n_hg, cap, gd // c.key_group_size, dtype=s_dt, device=dev)
        self.k_zero = torch.zeros(b, n_hg, cap, gd // c.key_group_size, dtype=z_dt, device=dev)
        self.v_codes = torch.zeros(b, n_kv, cap, packed_width(d, c.value_bits), dtype=u8, device=dev)
        self.v_scale = torch.zeros(b, n_kv, cap, d // c.value_group_size, dtype=s_dt, device=dev)
        self.v_zero = torch.zeros(b, n_kv, cap, d // c.value_group_size, dtype=z_dt, device=dev)
        self.pos = torch.full((b, cap), -1, dtype=torch.int32, device=dev)
        s = self.settings
        fp_slots = self.window_start + s.recent_window + s.flush_block
        self.fp_k = torch.zeros(b, n_kv, fp_slots, d, dtype=self.fp_dtype, device=dev)
        self.fp_v = torch.zeros_like(self.fp_k)
        self.fp_pos = torch.full((b, fp_slots), -1, dtype=torch.int32, device=dev)
        self.n_sinks = torch.zeros(b, dtype=torch.int64, device=dev)
        self.is_initialized = True
        self.window_slot = None
        self.storage_version += 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object):
        raise TypeError(
            "RkvCache stores pre-RoPE keys (or folded post-RoPE ones) and is written by the rkv attention handler "
            "(rkv_convert.runtime.attention.rkv_attention); attach it with rkv_convert.models.adapters.attach"
        )

    def get_seq_length(self, *args: object) -> int:
        return self.length

    def get_mask_sizes(self, query: int | torch.Tensor, *args: object) -> tuple[int, int]:
        """``(kv_length, kv_offset)``; ``query`` is the query length (or, in older transformers, cache_position)."""
        q_len = query if isinstance(query, int) else int(query.shape[0])
        return self.length + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # name used by older transformers 5.x releases
        return -1

    def reset(self) -> None:
        self.length = self.n_quant = self.n_window = self.reclaimed = 0
        for name in _STORAGE:
            self.__dict__.pop(name, None)
        self.is_initialized = False
        self.window_slot = None
        self.storage_version += 1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an rkv cache is append-only; cropping (assisted decoding) is not supported")

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        for name in _STORAGE:
            setattr(self, name, getattr(self, name).index_select(0, index).contiguous())
        self.batch = int(index.numel())
        self.storage_version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices.to(torch.long) if indices.dtype != torch.bool else indices.nonzero().flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def rows(self, start: int, n: int) -> "RkvCacheLayer":
        """An empty layer whose storage is rows ``start:start + n`` of this one (views, no copies).

        This layer must be allocated for the whole batch (:meth:`allocate`) and hold no token yet.
        Prefilling the view writes straight into this layer's tensors, so a large batch can be
        prefilled in slices without a second copy of its cache; :meth:`take_counts` then records
        the slots the slices wrote. The view cannot grow its store (it would detach from this
        layer): reserve the whole job up front.
        """
        if not self.is_initialized:
            raise ValueError("rows() needs an allocated layer (allocate(batch, ...) first)")
        if self.length:
            raise ValueError("rows() of a layer that already holds tokens")
        if start < 0 or n <= 0 or start + n > self.batch:
            raise ValueError(f"rows {start}:{start + n} do not fit a batch of {self.batch}")
        view = RkvCacheLayer(self.codec, self.settings, self.backend, self.rope)
        view.device, view.fp_dtype, view.batch = self.device, self.fp_dtype, n
        for name in _STORAGE:
            setattr(view, name, getattr(self, name)[start : start + n])
        view.is_initialized = True
        view.is_row_view = True
        return view

    def take_counts(self, view: "RkvCacheLayer", start: int) -> None:
        """Record the slots written through ``view`` (from :meth:`rows` at ``start``).

        Every slice of one padded prompt length leaves the same slot counts: the first slice sets
        them, the others must match.
        """
        counts = (view.length, view.n_quant, view.n_window)
        if start == 0:
            self.length, self.n_quant, self.n_window = counts
        elif counts != (self.length, self.n_quant, self.n_window):
            raise ValueError(f"micro-batch slot counts {counts} differ from the first one's "
                             f"{(self.length, self.n_quant, self.n_window)}: prompts must share one padded length")

    # ----- the rkv store ------------------------------------------------------------------
    @property
    def window_start(self) -> int:
        return self.settings.pinned_slots + 1

    @property
    def scratch_slot(self) -> int:
        return self.settings.pinned_slots

    def append(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        """Append ``T`` tokens: ``key``/``value`` ``[B, n_kv, T, d]``, RoPE ``positions [B, T]``.

        Keys as the layout's full-precision segment holds them: pre-RoPE (``prerope``) or post-RoPE
        (``folded``, RoPE'd at ``positions`` as the model does).

        ``valid`` (bool ``[B, T]``, default all) marks real tokens (padding gets position -1);
        ``sinks`` (bool ``[B, T]``) marks sink candidates (and salient tokens). They take a free pinned slot of
        their sequence; the rest join the recent window, whose overflow is quantized in whole blocks.
        Call :meth:`flush` afterwards (decode attends between the two, so the newest token is still
        in full precision).
        """
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        b, _, t, _ = key.shape
        pos = positions.to(self.device, torch.int32).expand(b, t)
        if valid is not None:
            valid = valid.to(self.device)
            pos = torch.where(valid, pos, _constant(-1, pos.dtype, pos.device))
            keep = valid[:, None, :, None].to(key.dtype)
            key = key * keep  # padding may carry anything; store zeros
            value = value * (keep if value.dtype == key.dtype else valid[:, None, :, None].to(value.dtype))
        key, value = key.to(self.fp_dtype), value.to(self.fp_dtype)
        if sinks is not None and self.settings.pinned_slots > 0:
            pos = self._take_sinks(key, value, pos, sinks.to(self.device) & (pos >= 0))
        self._append_window(key, value, pos)
        self.length += t

    def _take_sinks(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Copy flagged tokens (``key``/``value`` in the segment's dtype) into free sink slots; return
        ``pos`` with those tokens removed (-1).

        Runs at every decode step of every layer, so one token launches few ops (nine): a flagged
        token's slot is its sequence's sink count, and the scratch slot's position needs no reset,
        since only tokens not taken land there and they write -1. Several tokens (a prefill) go
        through :meth:`_take_sinks_many`.
        """
        b, n_kv, t, d = key.shape
        if t > 1:
            return self._take_sinks_many(key, value, pos, flags)
        rank = self.n_sinks[:, None]
        take = flags & (rank < self.settings.pinned_slots)
        slot = torch.where(take, rank, _constant(self.scratch_slot, torch.int64, rank.device))  # [B, T]
        index = slot[:, None, :, None].expand(b, n_kv, t, d)
        self.fp_k.scatter_(2, index, key)
        self.fp_v.scatter_(2, index, value)
        empty = _constant(-1, pos.dtype, pos.device)
        self.fp_pos.scatter_(1, slot, torch.where(take, pos, empty))
        self.n_sinks += take[:, 0]
        return torch.where(take, empty, pos)

    def _take_sinks_many(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """:meth:`_take_sinks` for several tokens (a prefill): each pinned slot gathers the token that takes it,
        so only the taken tokens are copied (a prefill's thousands of others stay where they are)."""
        b, n_kv, t, d = key.shape
        p = self.settings.pinned_slots
        rank = flags.cumsum(1) + (self.n_sinks - 1)[:, None]  # a flagged token's pinned slot
        take = flags & (rank < p)
        source = torch.full((b, p + 1), -1, dtype=torch.int64, device=key.device)  # per slot: its token, or -1
        source.scatter_(1, torch.where(take, rank, p), torch.arange(t, device=key.device).expand(b, t))
        source = source[:, :p]
        taken, index = source >= 0, source.clamp_min(0)
        for name, new in (("fp_k", key), ("fp_v", value)):
            buf = getattr(self, name)
            picked = new.gather(2, index[:, None, :, None].expand(b, n_kv, p, d))
            buf[:, :, :p] = torch.where(taken[:, None, :, None], picked, buf[:, :, :p])
        self.fp_pos[:, :p] = torch.where(taken, pos.gather(1, index), self.fp_pos[:, :p])
        self.n_sinks += take.sum(1)
        return torch.where(take, _constant(-1, pos.dtype, pos.device), pos)

    def _append_window(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        s, w0, t = self.settings, self.window_start, key.shape[2]
        capacity = s.recent_window + s.flush_block
        if self.static:
            self._append_window_static(key, value, pos, capacity)
            return
        if self.n_window + t <= capacity:
            lo = w0 + self.n_window
            self.fp_k[:, :, lo : lo + t] = key
            self.fp_v[:, :, lo : lo + t] = value
            self.fp_pos[:, lo : lo + t] = pos
            self.n_window += t
            return
        # More than fits: quantize the oldest whole blocks of (window + new tokens) straight away.
        w = self.n_window
        if w:
            all_k = torch.cat([self.fp_k[:, :, w0 : w0 + w], key], dim=2)
            all_v = torch.cat([self.fp_v[:, :, w0 : w0 + w], value], dim=2)
            all_pos = torch.cat([self.fp_pos[:, w0 : w0 + w], pos], dim=1)
        else:  # a prefill into an empty window: no copy of the prompt's keys and values (strided: a slow one)
            all_k, all_v, all_pos = key, value, pos
        total = w + t
        n_flush = -(-(total - capacity) // s.flush_block) * s.flush_block
        self._store(all_k[:, :, :n_flush], all_v[:, :, :n_flush], all_pos[:, :n_flush])
        keep = total - n_flush
        self.fp_k[:, :, w0 : w0 + keep] = all_k[:, :, n_flush:]
        self.fp_v[:, :, w0 : w0 + keep] = all_v[:, :, n_flush:]
        self.fp_pos[:, w0 : w0 + keep] = all_pos[:, n_flush:]
        self.fp_pos[:, w0 + keep :] = -1
        self.n_window = keep

    def _append_window_static(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, capacity: int) -> None:
        """One token into the window slot the device-side ``window_slot`` names, which then moves on:
        no host value decides where it lands, so a captured graph replays it at every step."""
        if key.shape[2] != 1:
            raise ValueError(f"a static cache layer takes one token per step, got {key.shape[2]}")
        if self.n_window + 1 > capacity:
            raise RuntimeError("the static window is full: flush() must run between steps")
        self.fp_k.index_copy_(2, self.window_slot, key)
        self.fp_v.index_copy_(2, self.window_slot, value)
        self.fp_pos.index_copy_(1, self.window_slot, pos)
        self.window_slot += 1
        self.n_window += 1

    def set_static(self, on: bool = True, slots: int | None = None) -> None:
        """Fixed-shape decode steps (one token each, for CUDA-graph capture): the kernels read the
        first ``slots`` store slots (default: all; whole 128-slot blocks, at least the used ones)
        and the whole full-precision segment (empty slots have position -1), the token lands in
        the window slot ``window_slot`` names, and the caller runs :meth:`flush` between steps (the
        attention handler does not). Needs an allocated layer; calling it again keeps ``window_slot``."""
        if not self.is_initialized:
            raise ValueError("set_static() needs an allocated layer")
        cap = self.pos.shape[1]
        slots = cap if slots is None else slots
        if on and not (self.n_quant <= slots <= cap and slots % _STORE_ALIGN == 0):
            raise ValueError(f"static store view of {slots} slots: needs whole {_STORE_ALIGN}-slot blocks from the "
                             f"{self.n_quant} used to the {cap} allocated")  # fmt: skip
        self.static_slots = slots if on else 0
        if not on:
            self.window_slot = None
        elif self.window_slot is None:
            self.window_slot = torch.tensor([self.window_start + self.n_window], dtype=torch.int64, device=self.device)

    @property
    def static(self) -> bool:
        """Fixed-shape decode steps are on (:meth:`set_static`): what a captured CUDA graph replays."""
        return self.window_slot is not None

    def needs_flush(self) -> bool:
        """True when the window holds ``recent_window + flush_block`` tokens (:meth:`flush` would quantize)."""
        s = self.settings
        return self.is_initialized and self.n_window >= s.recent_window + s.flush_block

    def advance(self) -> None:
        """Record one token appended by a replayed static step (the graph moved ``window_slot`` itself)."""
        self.length += 1
        self.n_window += 1

    def flush(self) -> int:
        """Quantize the window's oldest whole blocks while it holds ``recent_window + flush_block`` tokens.

        Returns the number of tokens moved to the quantized store.
        """
        s, w0 = self.settings, self.window_start
        if not self.needs_flush():
            return 0
        n_flush = (self.n_window - s.recent_window) // s.flush_block * s.flush_block
        hi = w0 + n_flush
        self._store(self.fp_k[:, :, w0:hi], self.fp_v[:, :, w0:hi], self.fp_pos[:, w0:hi])
        keep = self.n_window - n_flush
        self.fp_k[:, :, w0 : w0 + keep] = self.fp_k[:, :, hi : hi + keep].clone()
        self.fp_v[:, :, w0 : w0 + keep] = self.fp_v[:, :, hi : hi + keep].clone()
        self.fp_pos[:, w0 : w0 + keep] = self.fp_pos[:, hi : hi + keep].clone()
        self.fp_pos[:, w0 + keep :] = -1
        self.n_window = keep
        if self.static:
            self.window_slot.fill_(w0 + keep)
        return n_flush

    def _reserve(self, needed: int) -> None:
        cap = self.pos.shape[1]
        if needed <= cap:
            return
        if self.is_row_view:
            raise RuntimeError(f"a row view of a cache cannot grow past its {cap} reserved slots; reserve the whole job")
        new_cap = max(needed, 2 * cap)
        if needed <= self.capacity_hint:  # never past the reserved total while it suffices
            new_cap = min(new_cap, self.capacity_hint)
        new_cap = store_capacity(new_cap)
        n = self.n_quant
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
            setattr(self, name, _grow(getattr(self, name), n, new_cap, dim=2))
        self.pos = _grow(self.pos, n, new_cap, dim=1, fill=-1)
        self.storage_version += 1

    def store_hint(self) -> int:
        """Store slots to allocate up front: ``capacity_hint``, capped for a sliding layer at what
        reclaiming lets its store reach (the window's live slots, as many hidden ones, one flush)."""
        if self.window is None:
            return self.capacity_hint
        s = self.settings
        return min(self.capacity_hint, 2 * (self.window + s.recent_window + s.flush_block) + s.flush_block)

    def hidden_prefix(self) -> int:
        """Leading store slots every sequence has empty (position -1): never attended again."""
        n = self.n_quant
        if n == 0:
            return 0
        live = self.pos[:, :n] >= 0
        first_live = torch.where(live.any(1), live.int().argmax(1), torch.full_like(live[:, 0], n, dtype=torch.int64))
        return int(first_live.min())  # one host sync per store append of a sliding layer (every flush_block tokens)

    def _reclaim_hidden(self) -> None:
        """A sliding layer's store: move the live slots to the front once its hidden prefix is at
        least half of the used store (one copy of the used part; codes move, never re-quantized)."""
        if not self.hides or self.is_row_view:
            return
        n, h = self.n_quant, self.hidden_prefix()
        if h == 0 or 2 * h < n:
            return
        live, cap = n - h, self.pos.shape[1]
        target = store_capacity(max(_MIN_CAPACITY, self.store_hint(), 2 * live))
        new_cap = target if target < cap else cap  # a store grown by a long prompt shrinks back
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
            setattr(self, name, _grow(getattr(self, name).narrow(2, h, live), live, new_cap, dim=2))
        self.pos = _grow(self.pos.narrow(1, h, live), live, new_cap, dim=1, fill=-1)
        self.storage_version += 1
        self.n_quant = live
        self.reclaimed += h

    def _store(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Quantize, pack and append ``[B, n_kv, n, d]`` tokens to the store (never touching old ones)."""
        n = key.shape[2]
        if n == 0:
            return
        self._reclaim_hidden()
        self._reserve(self.n_quant + n)
        lo, hi = self.n_quant, self.n_quant + n
        if self.codec.folded:  # the kernel writes the store's own slots
            out = PackedKV(*(getattr(self, name)[:, :, lo:hi] for name in PackedKV._fields[:6]), self.pos[:, lo:hi])
            self._encode_folded(key, value, pos, out)
        else:
            for name, t in self.encode(key, value, pos).items():
                if name == "pos":
                    self.pos[:, lo:hi] = t
                else:
                    getattr(self, name)[:, :, lo:hi] = t
        self.n_quant = hi

    def _encode_folded(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, out: PackedKV | None = None) -> PackedKV:
        inv_freq, scaling = self.rope_or_raise()
        params = self.codec.folded_params(inv_freq, scaling, sm_scale=1.0)  # encoding reads no score factor
        return encode_folded(key, value, pos, params, self.codec.key_clip, self.codec.value_clip, out, backend=self.backend)

    def encode(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """The store entries of ``[B, n_kv, n, d]`` tokens at ``pos [B, n]`` (codes, scales, zeros, pos; nothing written).

        Every entry depends on its own token only, so a token encodes the same alone or among others.
        """
        c = self.codec
        b, n_kv, n, d = key.shape
        if c.folded:  # y = (k_post - RoPE_n(mu)) @ R_h, groups of consecutive channels (kernels.encode_folded)
            rows = self._encode_folded(key, value, pos)
            return {name: getattr(rows, name) for name in PackedKV._fields[:7]}
        if c.meta is not GroupMeta.FP16 or c.ranges is not GroupRanges.MINMAX:  # RkvConfig.validate refuses them
            raise ValueError(f"{c.meta.value} group metadata and {c.ranges.value} group ranges: the pre-RoPE layout "
                             "writes fp16 metadata and min-max ranges only")  # fmt: skip
        rows = key.transpose(1, 2).reshape(b, n, c.num_head_groups, c.group_channels)
        k_codes, k_scale, k_zero = (
            t.transpose(1, 2)
            for t in quantize_pack(
                rows, c.key_bits, c.key_group_size, c.key_clip,
                rotation=c.rotation, mean=c.k_mean, gid=c.k_gid, backend=self.backend,
            )
        )
        v_codes, v_scale, v_zero = (
            t.transpose(1, 2)
            for t in quantize_pack(value.transpose(1, 2), c.value_bits, c.value_group_size, c.value_clip, backend=self.backend)
        )
        return {"k_codes": k_codes, "k_scale": k_scale, "k_zero": k_zero, "v_codes": v_codes, "v_scale": v_scale,
                "v_zero": v_zero, "pos": pos}  # fmt: skip

    # ----- views for attention -----------------------------------------------------------
    def quantized(self) -> dict[str, torch.Tensor]:
        """The used part of the quantized store (views, no copies); a static layer: its ``static_slots``."""
        n = self.n_quant
        if self.static:
            if n > self.static_slots:
                raise RuntimeError(f"the static store view ({self.static_slots} slots) no longer covers the "
                                   f"{n} used ones: set_static(slots=) again before the step")  # fmt: skip
            n = self.static_slots
        return {
            "k_codes": self.k_codes[:, :, :n],
            "k_scale": self.k_scale[:, :, :n],
            "k_zero": self.k_zero[:, :, :n],
            "v_codes": self.v_codes[:, :, :n],
            "v_scale": self.v_scale[:, :, :n],
            "v_zero": self.v_zero[:, :, :n],
            "pos": self.pos[:, :n],
        }

    def full_precision(self) -> dict[str, torch.Tensor]:
        """Sinks, scratch slot and the used window (views); a static layer: the whole segment."""
        hi = self.fp_pos.shape[1] if self.static else self.window_start + self.n_window
        return {"fp_k": self.fp_k[:, :, :hi], "fp_v": self.fp_v[:, :, :hi], "fp_pos": self.fp_pos[:, :hi]}

    def packed_kv(self) -> PackedKV:
        """The used store and full-precision segment as the decode kernels read them (views, no copies)."""
        return PackedKV(**self.quantized(), **self.full_precision())

    def rope_or_raise(self) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_scaling)`` of the model this layer caches for."""
        if self.rope is None:
            raise ValueError("this cache layer was made without the model's RoPE (RkvCacheLayer(..., rope=...))")
        return self.rope

    # ----- accounting ----------------------------------------------------------------------
    def _slot_bytes(self) -> tuple[int, int]:
        """Bytes per (sequence, slot): quantized store, full-precision segment."""
        c = self.codec
        n_hg, gd, d, n_kv = c.num_head_groups, c.group_channels, c.head_dim, c.num_kv_heads
        meta = c.meta.bits // 8  # bytes per group for scale and zero
        quant = n_hg * (packed_width(gd, c.key_bits) + meta * (gd // c.key_group_size))
        quant += n_kv * (packed_width(d, c.value_bits) + meta * (d // c.value_group_size)) + 4
        elem = torch.empty((), dtype=self.fp_dtype or torch.float16).element_size()
        return quant, 2 * n_kv * d * elem + 4

    def bytes_used(self) -> int:
        """Bytes holding this layer's tokens: the used store plus the sink slots (reserved) and the window."""
        if not self.is_initialized:
            return 0
        quant, fp = self._slot_bytes()
        return self.batch * (self.n_quant * quant + (self.window_start + self.n_window) * fp)

    def bytes_allocated(self) -> int:
        """All bytes of this layer's tensors, growth headroom included."""
        if not self.is_initialized:
            return 0
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "pos", "fp_k", "fp_v", "fp_pos")
        return sum(getattr(self, n).nbytes for n in names)

    def fp16_equivalent_bytes(self) -> int:
        """What an fp16 cache (like transformers' ``DynamicCache``) holding the same slots would take."""
        return 2 * self.num_elements()

    def num_elements(self) -> int:
        """K and V elements of the tokens held (``B * slots * 2 * n_kv * d``; reclaimed slots are not held)."""
        if not self.is_initialized:
            return 0
        return self.batch * (self.length - self.reclaimed) * 2 * self.codec.num_kv_heads * self.codec.head_dim

    def sink_counts(self) -> torch.Tensor:
        return self.n_sinks.clone() if self.is_initialized else torch.zeros(0, dtype=torch.int64)

    def hide_before(self, first: torch.Tensor) -> None:
        """Sliding-window layers: slots of sequence ``b`` at positions below ``first[b]`` get position -1
        (never attended again; a sliding window only moves forward). Their store slots are reclaimed
        at the next store append (:meth:`_reclaim_hidden`)."""
        if not self.is_initialized:
            return
        self.hides = True
        first = first.to(self.pos.device, torch.int32)[:, None]
        for pos in (self.pos[:, : self.n_quant], self.fp_pos):
            pos.masked_fill_((pos >= 0) & (pos < first), -1)


def _layer_devices(model: torch.nn.Module, default: torch.device) -> list[torch.device]:
    """The device of each decoder layer's parameters (several with ``device_map="auto"``)."""
    devices = []
    for layer in decoder_layers(model):
        param = next(layer.parameters(), None)
        devices.append(param.device if param is not None else default)
    return devices or [default]


class RkvCache(Cache):
    """A ``Cache`` of :class:`RkvCacheLayer`, one per decoder layer, plus the model's RoPE table."""

    def __init__(
        self,
        codecs: list[LayerCodec],
        settings: CacheSettings,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        backend: str = "auto",
    ) -> None:
        rope = (inv_freq, float(attention_scaling))
        super().__init__(layers=[RkvCacheLayer(c, settings, backend, rope) for c in codecs])
        self.settings = settings
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(attention_scaling)
        self.backend = backend

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        model: torch.nn.Module,
        settings: CacheSettings | None = None,
        backend: str = "auto",
    ) -> "RkvCache":
        """A cache for ``model`` (whose RoPE table it copies) with ``checkpoint``'s calibration."""
        config = checkpoint.config
        ropes = layer_rope(model)  # per layer: Gemma 3's sliding layers have their own base
        devices = _layer_devices(model, ropes[0][0].device)
        codecs = [
            LayerCodec.from_checkpoint(config, checkpoint.key_rotation, layer, devices[i] if i < len(devices) else devices[-1], i)
            for i, layer in enumerate(checkpoint.layers)
        ]
        if len(codecs) != len(ropes):
            raise ValueError(f"checkpoint has {len(codecs)} layers, the model {len(ropes)}")
        settings = settings or CacheSettings.from_config(config)
        cache = cls(codecs, settings, ropes[0][0], ropes[0][1], backend)
        family = adapter_for(model.config)
        for layer, (inv_freq, scaling), module in zip(cache.layers, ropes, attention_modules(model), strict=True):
            layer.rope = (inv_freq.to(layer.codec.device, torch.float32), scaling)
            layer.window = family.sliding_window(module)
        return cache

    def reserve(self, tokens: int) -> "RkvCache":
        """Size every layer's store for ``tokens`` slots when it is allocated (no doubling on the way)."""
        for layer in self.layers:
            layer.capacity_hint = int(tokens)
        return self

    def allocate(self, batch: int, dtype: torch.dtype) -> None:
        """Allocate every layer for ``batch`` sequences before any token arrives, each on its layer's device."""
        for layer in self.layers:
            layer.allocate(batch, layer.codec.device, dtype)

    def rows(self, start: int, n: int) -> "RkvCache":
        """A cache over rows ``start:start + n`` of this allocated, empty one (see :meth:`RkvCacheLayer.rows`)."""
        view = RkvCache([layer.codec for layer in self.layers], self.settings, self.inv_freq, self.attention_scaling,
                        self.backend)  # fmt: skip
        view.layers = [layer.rows(start, n) for layer in self.layers]
        return view

    def take_counts(self, view: "RkvCache", start: int) -> None:
        """Record the slots a prefilled :meth:`rows` view wrote (see :meth:`RkvCacheLayer.take_counts`)."""
        for layer, other in zip(self.layers, view.layers, strict=True):
            layer.take_counts(other, start)

    def lengths(self) -> list[int]:
        """Slots each layer has received (0 for a layer never written)."""
        return [layer.length if layer.is_initialized else 0 for layer in self.layers]

    def bytes_used(self) -> int:
        return sum(layer.bytes_used() for layer in self.layers)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def fp16_equivalent_bytes(self) -> int:
        return sum(layer.fp16_equivalent_bytes() for layer in self.layers)

    def bits_per_element(self) -> float:
        """Real bits per cached K/V element: all bytes used (codes, scales, positions, fp segment) * 8 / elements."""
        elements = sum(layer.num_elements() for layer in self.layers)
        return 8.0 * self.bytes_used() / elements if elements else 0.0
