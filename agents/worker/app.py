"""`App` and `@app.capability(...)`: a capability reads as a declaration.

    app = App()

    @app.capability(type="chat", model="tiny", gpus=1)
    async def chat(ctx: JobContext, p: ChatRequest) -> ChatReply:
        return ChatReply(reply=...)

A handler takes the job's context and, optionally, its payload: the runtime
decodes the payload into the second parameter's annotation with msgspec (a
Struct, a dataclass, a TypedDict, `dict`...), and a payload that does not
validate fails the job at once with `invalid_payload` and msgspec's message.
The result (anything msgspec can encode) becomes the job's result. Handlers
are async, or plain functions run in a thread.

`@app.on_start` / `@app.on_stop` functions run once when a worker serving the
app starts and stops (load a model once, release it); their durations are
logged and reported in the worker's control info.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas.jobs import Resources, is_valid_capability_type

Handler = Callable[..., Any]
Hook = Callable[..., Any]


class InvalidPayload(ValueError):
    """The payload does not fit the handler's declared type."""


@dataclass
class CapabilitySpec:
    type: str
    handler: Handler
    labels: dict[str, str] = field(default_factory=dict)
    # What every job of this capability needs leased unless it asks for more.
    resources: Resources = field(default_factory=Resources)
    # The most jobs of this capability one worker runs at once (None: no own limit).
    concurrency: int | None = None
    # The second parameter's annotation; None when the handler takes the context only.
    payload_type: Any = None
    takes_payload: bool = False

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def advert(self) -> dict[str, str]:
        return {"type": self.type, **self.labels}

    def decode_payload(self, payload: dict[str, Any]) -> Any:
        """The payload as the handler declared it; InvalidPayload when it does not fit."""
        if not self.takes_payload or self.payload_type in (None, Any, dict):
            return payload
        try:
            return msgspec.convert(payload, self.payload_type)
        except msgspec.ValidationError as exc:
            raise InvalidPayload(str(exc)) from None

    def call(self, ctx: Any, payload: Any) -> Any:
        return self.handler(ctx, payload) if self.takes_payload else self.handler(ctx)


def _payload_parameter(fn: Handler) -> tuple[bool, Any]:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise ValueError(f"handler {fn.__name__} must take the job's context (ctx) first")
    if len(params) == 1:
        return False, None
    if len(params) > 2:
        raise ValueError(f"handler {fn.__name__} takes (ctx) or (ctx, payload), "
                         f"not {len(params)} parameters")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved here: take it as written
        hints = {}
    annotation = hints.get(params[1].name, params[1].annotation)
    if annotation is inspect.Parameter.empty:
        annotation = None
    return True, annotation


class App:
    def __init__(self, name: str = "jetfleet") -> None:
        self.name = name
        self.capabilities: dict[str, CapabilitySpec] = {}
        self.start_hooks: list[Hook] = []
        self.stop_hooks: list[Hook] = []

    def capability(self, type: str, *, gpus: int = 0, gpu_memory_mb: int = 0,
                   cpu_slots: int = 0, concurrency: int | None = None,
                   **labels: object) -> Callable[[Handler], Handler]:
        if not is_valid_capability_type(type):
            raise ValueError(f"capability type {type!r}: use dot-separated lower-case words")
        for key, value in labels.items():
            if not isinstance(value, str | int | float | bool) or key == "type":
                raise ValueError(f"capability label {key}={value!r}: labels are plain strings")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"capability {type!r}: concurrency must be at least 1")
        resources = msgspec.convert({"gpus": gpus, "gpu_memory_mb": gpu_memory_mb,
                                     "cpu_slots": cpu_slots}, Resources)

        def register(fn: Handler) -> Handler:
            if type in self.capabilities:
                raise ValueError(f"capability {type!r} is declared twice")
            takes, annotation = _payload_parameter(fn)
            self.capabilities[type] = CapabilitySpec(
                type=type, handler=fn, labels={k: str(v) for k, v in labels.items()},
                resources=resources, concurrency=concurrency, payload_type=annotation,
                takes_payload=takes)
            return fn

        return register

    def on_start(self, fn: Hook) -> Hook:
        """Run once when a worker serving this app starts (sync or async, no arguments)."""
        self.start_hooks.append(fn)
        return fn

    def on_stop(self, fn: Hook) -> Hook:
        """Run once when the worker stops."""
        self.stop_hooks.append(fn)
        return fn

    def include(self, other: App) -> App:
        for spec in other.capabilities.values():
            if spec.type in self.capabilities:
                raise ValueError(f"capability {spec.type!r} is declared twice")
            self.capabilities[spec.type] = spec
        self.start_hooks.extend(other.start_hooks)
        self.stop_hooks.extend(other.stop_hooks)
        return self
