"""Decode steps replayed from a captured CUDA graph: the batch-1 path without host overhead.

At small batches a decode step is bound by host time: every layer launches a few dozen torch ops
and three Triton kernels, and Python pays for each. :class:`DecodeGraph` runs the first decode
step eagerly with the cache in *static* mode (``RkvCacheLayer.set_static``: fixed tensor shapes,
the window slot chosen on the device), captures the next step of the whole model in one
``torch.cuda.CUDAGraph``, and replays it for every later step. Between replays it does on the host
what the captured Python did: it counts the token in every layer and flushes full windows
(eagerly, every ``flush_block`` steps). A replayed step reads the inputs it was captured with
(``input_ids``, ``position_ids``), so the runner copies each step's tokens into them.

The kernels of a static step read a fixed prefix of the store: the used slots plus about
``lookahead`` more, in whole 128-slot blocks (empty slots have position -1 and weigh nothing). Once
the flushed slots outgrow it, the prefix is extended and the step recaptured (every ``lookahead``
tokens): a short generation in a large reservation does not read the whole reservation every
step. A graph is also recaptured when any layer's storage tensors are replaced (the store grew
past its reservation, the batch was reordered): ``RkvCacheLayer.storage_version``. What cannot be captured
is refused up front, with the reason (:func:`decode_graph_supports`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..kernels._common import resolve_backend
from ..models.adapters import rope_limit
from .cache import RkvCache, store_capacity

__all__ = ["DecodeGraph", "decode_graph_supports"]


def decode_graph_supports(cache: RkvCache, model: nn.Module) -> str | None:
    """``None`` if the decode steps of ``model`` over ``cache`` can be captured; else the reason they cannot."""
    layers = [layer for layer in cache.layers if layer.is_initialized]
    if len(layers) != len(cache.layers) or not layers:
        return "the cache is not allocated in every layer (prefill first)"
    devices = {layer.device for layer in layers}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"CUDA graphs need every layer on one CUDA device; the cache is on {sorted(map(str, devices))}"
    probe = torch.empty(0, device=next(iter(devices)))
    if not resolve_backend(cache.backend, probe):
        return f"the cache's backend {cache.backend!r} runs the pure-torch reference, not the Triton kernels"
    if any(layer.window is not None for layer in layers):
        return "sliding-window layers hide and reclaim slots with host reads every step"
    if rope_limit(model.config) is not None:
        return "a longrope model checks every step's positions on the host"
    return None


class DecodeGraph:
    """Decode steps of ``model`` (the rkv handler attached) over ``cache``, replayed from a CUDA graph.

    ``capture=False`` runs every step eagerly in static mode: the same cache bookkeeping without a
    graph (what the CPU tests check against the plain path). ``forward``: what runs a step
    (default: ``model`` itself; a caller that replaced ``model.forward`` passes the original).
    """

    def __init__(self, model: nn.Module, cache: RkvCache, cache_argument: str, capture: bool = True,
                 forward: Callable[..., object] | None = None, lookahead: int = 512) -> None:  # fmt: skip
        if capture:
            reason = decode_graph_supports(cache, model)
            if reason is not None:
                raise ValueError(f"cannot capture the decode step in a CUDA graph: {reason}")
        self.model, self.cache, self.cache_argument, self.capture = model, cache, cache_argument, capture
        self._call = forward if forward is not None else model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0  # steps replayed from a graph
        self.captures = 0  # graphs captured (one, plus one per store-view extension or storage replacement)
        self._versions: tuple[int, ...] = ()
        self._ids: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self.lookahead = lookahead
        self.slots = -1  # store slots the static steps read (_cover)
        self._cover()

    def _cover(self) -> bool:
        """Extend every layer's static store view once the used slots outgrow it; True if it changed."""
        if all(0 <= layer.n_quant <= self.slots <= layer.pos.shape[1] for layer in self.cache.layers):
            return False
        used = max(layer.n_quant for layer in self.cache.layers)
        cap = min(layer.pos.shape[1] for layer in self.cache.layers)
        self.slots = min(cap, store_capacity(used + self.lookahead))
        for layer in self.cache.layers:
            layer.set_static(True, self.slots)
        return True

    def close(self) -> None:
        """Release the graph and return the cache to plain (dynamic) steps."""
        self.graph = None
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.set_static(False)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self._call(input_ids=ids, position_ids=positions, use_cache=True, **{self.cache_argument: self.cache})
        return out.logits[:, -1]

    def _after_step(self) -> None:
        """Flush full windows; a flush that outgrows the store view extends it and retires the graph."""
        flushed = False
        for layer in self.cache.layers:
            if layer.needs_flush():
                layer.flush()
                flushed = True
        if flushed and self._cover():
            self.graph = None

    def _current(self) -> bool:
        """A graph exists and every layer still has the storage tensors it was captured with."""
        return self.graph is not None and self._versions == tuple(layer.storage_version for layer in self.cache.layers)

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one new token per sequence (``input_ids, position_ids [B, 1]``).

        The returned tensor is the graph's output buffer: read or copy it before the next step.
        """
        if input_ids.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per sequence, got {input_ids.shape[1]}")
        if not self.capture:
            logits = self._forward(input_ids, position_ids)
            self._after_step()
            return logits
        if self._current():
            self._ids.copy_(input_ids)
            self._positions.copy_(position_ids)
            self.graph.replay()
            self.replays += 1
            for layer in self.cache.layers:
                layer.advance()
            self._after_step()
            return self._logits
        logits = self._forward(input_ids, position_ids)  # eager: compiles the kernels for these shapes
        self._after_step()
        self._capture(input_ids, position_ids)
        return logits

    def _capture(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Record one step without running it: the host counters the captured Python moved are restored."""
        counts = [(layer.length, layer.n_window) for layer in self.cache.layers]
        self._ids, self._positions = input_ids.clone(), position_ids.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                self._logits = self._forward(self._ids, self._positions)
        finally:
            for layer, (length, n_window) in zip(self.cache.layers, counts):
                layer.length, layer.n_window = length, n_window
        self.graph = graph
        self.captures += 1
        self._versions = tuple(layer.storage_version for layer in self.cache.layers)
