"""Streaming statistics gathered in forward passes: nothing per layer is dumped to disk."""

from __future__ import annotations

import torch

__all__ = ["ActivationObserver", "CalibrationError", "FirstKeyObserver", "KeyMomentObserver", "RotatedKeyObserver", "flatten_heads"]


class CalibrationError(RuntimeError):
    """The calibration data cannot give a statistic rkv needs; the message names the fix."""


def flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, d]`` → ``[B*T, heads*d]`` (channel = head*d + i), in fp32."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], -1).float()


class ActivationObserver:
    """Per token of a layer's residual input: its largest |h| and the channel holding it;
    plus a fixed-stride sample of |h| entries for the layer's median magnitude."""

    def __init__(self, sample_stride: int = 97) -> None:
        self.token_max: list[torch.Tensor] = []
        self.token_argmax: list[torch.Tensor] = []
        self.samples: list[torch.Tensor] = []
        self.sample_stride = sample_stride

    def update(self, hidden: torch.Tensor) -> None:
        flat = hidden.reshape(-1, hidden.shape[-1]).abs().float()
        values, channels = flat.max(dim=-1)
        self.token_max.append(values.cpu())
        self.token_argmax.append(channels.cpu())
        self.samples.append(flat.reshape(-1)[:: self.sample_stride].cpu())

    def result(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(per-token max |h|, its channel, median |h|)."""
        return torch.cat(self.token_max), torch.cat(self.token_argmax), float(torch.cat(self.samples).median())


class KeyMomentObserver:
    """Running per-channel mean and variance of the pre-RoPE keys over the tokens not flagged as sinks."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.count = 0

    def update(self, keys: torch.Tensor, keep: torch.Tensor) -> None:
        rows = keys[keep].double()
        self.total = rows.sum(0) if self.total is None else self.total + rows.sum(0)
        sq = rows.pow(2).sum(0)
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += rows.shape[0]

    def _check(self) -> None:
        if self.total is None or self.count == 0:
            raise CalibrationError("no calibration tokens reached the key observer (every token was padding or a "
                                   "sink); calibrate on more or longer text: --samples, --seqlen, --data")

    def result(self) -> torch.Tensor:
        """fp32 ``[channels]``: the mean."""
        self._check()
        return (self.total / self.count).float().cpu()

    def spread(self, centred: bool = True) -> torch.Tensor:
        """fp64 ``[channels]``: the (biased) variance, or with ``centred=False`` the mean square."""
        self._check()
        mean_sq = self.total_sq / self.count
        return (mean_sq - (self.total / self.count).pow(2) if centred else mean_sq).clamp_min(0.0).cpu()


class RotatedKeyObserver:
    """Per-channel mean |x| of centred keys before and after rotation, and row samples of the
    rotated keys and values (sinks excluded) for measuring quantization error."""

    def __init__(self, max_rows: int, seed: int) -> None:
        self.abs_before: torch.Tensor | None = None
        self.abs_after: torch.Tensor | None = None
        self.count = 0
        self.max_rows = max_rows
        self.key_rows: list[torch.Tensor] = []
        self.value_rows: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.kept_rows = 0

    def update(self, centred: torch.Tensor, rotated: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
               rows_per_batch: int) -> None:
        before, after = centred[keep].abs().double().sum(0), rotated[keep].abs().double().sum(0)
        self.abs_before = before if self.abs_before is None else self.abs_before + before
        self.abs_after = after if self.abs_after is None else self.abs_after + after
        self.count += int(keep.sum())
        take = min(rows_per_batch, self.max_rows - self.kept_rows)
        candidates = keep.nonzero().squeeze(1).cpu()
        if take > 0 and candidates.numel():
            pick = candidates[torch.randperm(candidates.numel(), generator=self.generator)[:take]]
            self.key_rows.append(rotated[pick.to(rotated.device)].cpu())
            self.value_rows.append(values[pick.to(values.device)].cpu())
            self.kept_rows += pick.numel()

    def result(self) -> dict[str, torch.Tensor]:
        return {
            "abs_before": (self.abs_before / self.count).float().cpu(),
            "abs_after": (self.abs_after / self.count).float().cpu(),
            "key_rows": torch.cat(self.key_rows),
            "value_rows": torch.cat(self.value_rows),
        }


class FirstKeyObserver:
    """Running mean of each window's first centred key ``[n_kv, d]``: the attention sink's key."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, first: torch.Tensor) -> None:
        """``first [B, n_kv, d]``: the centred keys at position 0 of ``B`` windows."""
        total = first.double().sum(0).cpu()
        self.total = total if self.total is None else self.total + total
        self.count += first.shape[0]

    def result(self) -> torch.Tensor:
        """fp32 ``[n_kv, d]``: the mean."""
        if self.total is None:
            raise CalibrationError("no calibration window reached the first-key observer; calibrate on more text")
        return (self.total / self.count).float()
