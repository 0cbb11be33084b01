"""What differs between the transformers versions lambdapo supports, in one place: the
keyword and attribute under which a forward takes and returns its key-value cache, and the
selection of a cache's rows."""

from __future__ import annotations

import inspect

from torch import Tensor, nn


def cache_argument(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes a key-value cache (transformers 5
    renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_of(output):
    """The key-value cache a transformers forward returned (under either name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def select_cache_rows(cache, rows: Tensor) -> None:
    """``cache.batch_select_indices(rows)`` (rows may repeat), with ``index_select`` where
    that method is transformers' own for the cache and its layer: transformers indexes the
    keys and values, whose accumulating ``index_put_`` backward took 3-10x longer on the CPU
    than ``index_select``'s ``index_add_``. A cache or layer with a selection of its own
    keeps it."""
    from transformers.cache_utils import Cache, DynamicLayer

    if type(cache).batch_select_indices is not Cache.batch_select_indices:
        cache.batch_select_indices(rows)
        return
    for layer in cache.layers:
        if (type(layer).batch_select_indices is DynamicLayer.batch_select_indices
                and layer.get_seq_length() > 0):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        else:
            layer.batch_select_indices(rows)
