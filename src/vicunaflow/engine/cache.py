"""The KV cache the model owns: static per-layer buffers, one row ("slot") per request.

Keys and values of shape [slots, kv_heads, context, head_dim] per layer, allocated once. Each row
has its own length, so requests of any length share one decode step. Active requests occupy rows
0..n-1 (the scheduler moves the last row into a freed one), so every step reads plain slices.
With tensor parallelism a rank holds only its own KV heads.
"""

from __future__ import annotations

import torch

from vicunaflow import VicunaflowError


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, context: int, head_dim: int, dtype: torch.dtype, device):
        device = torch.device(device)
        per_layer = 2 * slots * kv_heads * context * head_dim * dtype.itemsize
        _check_memory(device, layers * per_layer, slots, context)
        shape = (slots, kv_heads, context, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.context = slots, context

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' keys/values: k, v [B, T, kv_heads, head_dim] go to rows [B, 1] at positions [B, T]."""
        # advanced indices around a slice: the indexed view is [B, T, kv_heads, head_dim], like k
        self.keys[layer][rows, :, positions] = k
        self.values[layer][rows, :, positions] = v

    def read(self, layer: int, rows: slice | torch.Tensor, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, kv_length, head_dim] to attend over: views of a slice of rows, or
        copies gathered from a [B] tensor of rows."""
        return self.keys[layer][rows, :, :kv_length], self.values[layer][rows, :, :kv_length]

    def clear(self) -> None:
        for tensor in self.keys + self.values:
            tensor.zero_()

    def move_row(self, source: int, target: int, length: int) -> None:
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def swap_rows(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange two rows' first length_a / length_b positions."""
        for tensor in self.keys + self.values:
            held = tensor[a, :, :length_a].clone()
            tensor[a, :, :length_b] = tensor[b, :, :length_b]
            tensor[b, :, :length_a] = held


def _check_memory(device: torch.device, needed: int, slots: int, context: int) -> None:
    """Fail with advice, not an out-of-memory trace, when the KV cache cannot fit next to the weights."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if needed > 0.9 * free:
        raise VicunaflowError(
            f"the KV cache for {slots} requests x {context} tokens needs {needed / 2**30:.1f} GiB on {device}, "
            f"{free / 2**30:.1f} GiB are free; lower --max-batch-size or --max-context, or add --num-gpus"
        )
