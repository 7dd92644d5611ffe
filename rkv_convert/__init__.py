"""rkv: practical 2-bit KV caches (RotateKV) for Hugging Face causal LMs."""

from .runtime.api import load

__all__ = ["load"]
