"""The KV caches of the shared prompt (vlm.prompt_states): each prompt's keys and values are
computed for B rows and read by its G completion rows.

transformers' DynamicCache appends every call's keys and values by copying the whole cache
(torch.cat): slow for decoding, one token per step (GrowingLayer writes in place instead), and
wrong for a log-prob pass under activation checkpointing, whose replays would append twice (see
below).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


def prompt_cache() -> Cache:
    """The cache a prompt pass fills: one KeepFirstLayer per layer, made as the model asks."""
    return Cache(layer_class_to_replicate=KeepFirstLayer)


def rows_cache(states: list, new_tokens: int | None = None) -> Cache:
    """The cache of completion rows that start from `states`, per layer (keys, values) [N, h, P, d]:
    with room for decoding `new_tokens` more (GrowingLayer), or, when None, for a log-prob pass
    that only reads it (ReadOnlyLayer)."""
    if new_tokens is None:
        layers = [ReadOnlyLayer() for _ in states]
        for layer, (keys, values) in zip(layers, states):
            layer.update(keys, values)
    else:
        layers = [GrowingLayer(keys, values, new_tokens) for keys, values in states]
    return Cache(layers=layers)


class GrowingLayer(DynamicLayer):
    """Decoding's cache layer: the rows' prompt states and room for `capacity` more tokens in one
    buffer allocated up front. Each step writes its token in place and attends to a view of the
    filled part; a DynamicLayer would torch.cat a copy of the whole cache at every token."""

    def __init__(self, keys, values, capacity: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        n, h, p, d = keys.shape
        self.key_buffer = keys.new_empty(n, h, p + capacity, d)
        self.value_buffer = values.new_empty(n, h, p + capacity, d)
        self.key_buffer[:, :, :p], self.value_buffer[:, :, :p] = keys, values
        self.keys, self.values = self.key_buffer[:, :, :p], self.value_buffer[:, :, :p]

    def update(self, keys, values, *args, **kwargs):
        start, end = self.keys.shape[-2], self.keys.shape[-2] + keys.shape[-2]
        self.key_buffer[:, :, start:end], self.value_buffer[:, :, start:end] = keys, values
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows `index` [n] of the batch (finished rows leave decoding)."""
        end = self.keys.shape[-2]
        self.key_buffer, self.value_buffer = self.key_buffer[index], self.value_buffer[index]
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]


# Activation checkpointing replays each layer's forward in the backward pass, and transformers
# takes the cache away from a checkpointed layer, since a replayed layer would append its keys
# a second time. The two caches of a log-prob pass are safe to replay, so the prompt is shared
# with checkpointing on too: the prompt pass keeps its first write (KeepFirstLayer) and the
# completion pass only reads the prompt's states (ReadOnlyLayer).
class KeepFirstLayer(DynamicLayer):
    """A prompt pass's cache layer: keeps the keys and values of its first call, returns each
    call's own (the prompt's tokens attend to each other); a replay writes nothing."""

    def update(self, keys, values, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
        return keys, values


class ReadOnlyLayer(DynamicLayer):
    """A completion pass's cache layer: the first call stores the rows' prompt states; every
    later call returns them followed by its own tokens' and stores nothing."""

    def update(self, keys, values, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
            return keys, values
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)


@contextmanager
def checkpointed_layers_keep_cache(model):
    """Let checkpointed layers see the (replay-safe) cache during a prompt or completion pass."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache   # back to the class's False
