"""Reading a whole KV bucket (its keys) or a key's history, without nats-py's
false "nothing there".

nats-py's `keys()` and `history()` run a watcher that decides the initial
values are all in once the consumer's pending count reads 0; that count can
read 0 after the server delivered the first entries and before the watcher
took them, and the watcher then ends empty: NoKeysError for a bucket that has
keys (seen in the suite, on a loaded machine, for the advert bucket and a
resource's history). Here an empty answer is believed only when the stream
holds nothing for it, or after three tries.
"""

from __future__ import annotations

from typing import Any

from nats.js.errors import NoKeysError, NotFoundError
from nats.js.kv import KeyValue

TRIES = 3


async def _holds_any(kv: KeyValue, key: str | None) -> bool:
    """Whether the bucket's stream holds any message (for `key`, if given)."""
    js: Any = getattr(kv, "_js", None)
    stream = getattr(kv, "_stream", None)
    if js is None or stream is None:
        return True
    if key is None:
        info = await js.stream_info(stream)
        return int(info.state.messages or 0) > 0
    pre = getattr(kv, "_pre", f"$KV.{getattr(kv, '_name', '')}.")
    try:
        await js.get_last_msg(stream, f"{pre}{key}")
    except NotFoundError:
        return False
    return True


async def keys(kv: KeyValue) -> list[str]:
    """Every live key of the bucket ([] when there is none)."""
    for attempt in range(TRIES):
        try:
            return list(await kv.keys())
        except NoKeysError:
            if attempt == TRIES - 1 or not await _holds_any(kv, None):
                return []
    return []


async def history(kv: KeyValue, key: str) -> list[Any]:
    """Every entry the bucket keeps for `key`, oldest first ([] when none)."""
    for attempt in range(TRIES):
        try:
            return list(await kv.history(key))
        except NoKeysError:
            if attempt == TRIES - 1 or not await _holds_any(kv, key):
                return []
    return []
