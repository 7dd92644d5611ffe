"""The engine's decode steps replayed from CUDA graphs, one per bucket of rows.

A served decode step is bound by host time: every layer launches dozens of small ops, and the
engine thread shares the interpreter with the HTTP loop. :class:`RowDecodeGraph` runs the row
cache's steps static (:meth:`~.row_cache.RowCache.begin_step` with a bound: the active rows padded
to a bucket, fixed shapes) and replays one captured graph per bucket, so a step costs one launch
whatever the batch. Buckets (:func:`buckets`) are multiples of 8 up to 64, then of 16: a graph
serves every active count up to its bucket, at the price of the padding rows' compute.

A bucket is captured at its second step (the first runs eagerly and compiles the kernels for its
shapes) and replayed from then on; the engine runs both for every bucket before serving
(:meth:`~.engine.Engine.capture_graphs`, padding rows only). Every graph reads the cache's storage tensors at the addresses
they had when it was captured: when the store grows (``RowState.version``), all graphs are dropped
and recaptured as their buckets come back. The graphs share one memory pool (they never run at the
same time; a new pool after a drop). What cannot be captured is refused up front, with the reason
(``runtime.decode_graph.decode_graph_supports``: the row cache is an ``RkvCache``, so the same check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.decode_graph import decode_graph_supports
from .row_cache import RowCache

__all__ = ["RowDecodeGraph", "buckets", "bucket_for"]


def buckets(max_rows: int) -> list[int]:
    """The bound of every static step for an engine of ``max_rows`` rows, ascending (the last is ``max_rows``)."""
    out = [b for b in range(8, min(64, max_rows) + 1, 8)]
    out += [b for b in range(80, max_rows + 1, 16)]
    if not out or out[-1] != max_rows:
        out.append(max_rows)
    return out


def bucket_for(active: int, bounds: list[int]) -> int:
    """The smallest bound that holds ``active`` rows."""
    for b in bounds:
        if b >= active:
            return b
    raise ValueError(f"{active} active rows exceed the largest bucket, {bounds[-1]}")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # long [bound, 1]: the inputs the graph reads
    positions: torch.Tensor
    logits: torch.Tensor  # [bound, vocab]: the graph's output buffer


class RowDecodeGraph:
    """Static decode steps of ``model`` (the rkv handler attached) over a :class:`RowCache`.

    ``capture=False`` runs every step static but eagerly: the same padding and bookkeeping without
    graphs (what the CPU tests check against plain steps).
    """

    def __init__(self, model: nn.Module, cache: RowCache, cache_argument: str, capture: bool = True) -> None:
        if capture:
            reason = decode_graph_supports(cache, model)
            if reason is not None:
                raise ValueError(f"cannot capture the engine's decode step in a CUDA graph: {reason}")
        self.model, self.cache, self.cache_argument, self.capture = model, cache, cache_argument, capture
        self.bounds = buckets(cache.rows)
        self.graphs: dict[int, _Captured] = {}
        self._seen: set[int] = set()  # buckets run eagerly since the last storage change (kernels compiled)
        self._version = cache.state.version
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self.captures = 0
        self.eager_steps = 0

    def bound(self, active: int) -> int:
        """The rows the next step runs over for ``active`` rows."""
        return bucket_for(active, self.bounds)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self.cache_argument: self.cache})
        return out.logits[:, -1]

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Logits ``[bound, vocab]`` of a static step whose ``begin_step(bound)`` already ran, and how it
        ran: ``"replay"``, ``"capture"`` (the graph replayed now was recorded by this step's forward) or
        ``"eager"``. Only where the model's Python forward ran (capture, eager) did the attention handler
        count its appends, which the caller may check. ``ids, positions [bound, 1]``; padding rows may hold
        anything in range. The result may be a graph's buffer: read it before the next step."""
        st = self.cache.state
        if not st.static or ids.shape[0] != st.bound:
            raise RuntimeError(f"a static step of {ids.shape[0]} rows needs begin_step(bound={ids.shape[0]}) first")
        if st.version != self._version:
            self._drop_graphs()
            self._version = st.version
        bound = st.bound
        captured = self.capture and bound not in self.graphs and bound in self._seen
        if captured:
            self._capture(bound, ids)
        if bound in self.graphs:
            g = self.graphs[bound]
            g.ids.copy_(ids)
            g.positions.copy_(positions)
            g.graph.replay()
            self.replays += 1
            return g.logits, "capture" if captured else "replay"
        self._seen.add(bound)
        self.eager_steps += 1
        return self._forward(ids, positions), "eager"

    def _drop_graphs(self) -> None:
        """Forget every graph (the storage moved). Their pool goes with them: PyTorch frees a pool
        whose last graph is gone, and a capture into a freed pool's handle fails, so take a new one."""
        self.graphs.clear()
        self._seen.clear()
        if self.capture:
            self._pool = torch.cuda.graph_pool_handle()

    def _capture(self, bound: int, ids: torch.Tensor) -> None:
        """Record one step of ``bound`` rows without running it (host counters the Python moved are restored by
        the next ``begin_step``; the recorded device writes happen at replay)."""
        ids_buf = torch.zeros_like(ids)
        pos_buf = torch.zeros_like(ids)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(ids_buf, pos_buf)
        self.graphs[bound] = _Captured(graph, ids_buf, pos_buf, logits)
        self.captures += 1
