"""LoRA adapters: many in one batch over the same base model.

``request`` (the ``LoRARequest`` users pass), ``models`` (reading PEFT adapters into host
tensors), ``layers`` (linear layers with stacked per-slot A/B weights), ``manager`` (device
slots in an LRU backed by host copies; the worker side). The kernels are ``kernels/lora.py``.
"""
from aphrodite.lora.request import LoRARequest

__all__ = ["LoRARequest"]
