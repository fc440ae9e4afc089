"""The video prefix cache: prefilled prompt states of recent videos, kept for follow-ups.

A follow-up question about a video (same conversation or a new one) shares the start of its
prompt with the previous one: system prompt, the video's placeholder tokens, maybe earlier
turns. The target adapter can restore that part from a `PrefixState` and prefill only the
rest (see `TargetAdapter.prefill(prefix=...)`), so the video's prefill is paid once.

Keyed by the video's content hash and frame settings (the serving engine has one target, so
the model is implied); least recently used entries are dropped to stay under `max_bytes`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from sparrow.targets.base import PrefixState


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[str, PrefixState] = OrderedDict()
        self._lock = threading.Lock()  # /health reads while the worker writes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(state.nbytes() for state in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> PrefixState | None:
        with self._lock:
            state = self._entries.get(key)
            if state is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return state

    def put(self, key: str, state: PrefixState) -> None:
        size = state.nbytes()
        with self._lock:
            self._entries.pop(key, None)
            if size > self.max_bytes:
                return  # larger than the whole budget: not kept
            self._entries[key] = state
            total = sum(s.nbytes() for s in self._entries.values())
            while total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes()
                self.stats.evictions += 1
