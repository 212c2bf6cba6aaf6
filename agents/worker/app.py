"""`App` and `@app.capability(...)`: a capability reads as a declaration.

    app = App()

    @app.capability(type="chat", model="tiny", gpus=1)
    async def chat(ctx: JobContext) -> dict:
        return {"reply": ...}

Handlers are async, or plain functions run in a thread. They take the job's
context and return its result (anything JSON-encodable).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.jobs import Resources, is_valid_capability_type

Handler = Callable[..., Any]


@dataclass
class CapabilitySpec:
    type: str
    handler: Handler
    labels: dict[str, str] = field(default_factory=dict)
    # What every job of this capability needs leased unless it asks for more.
    resources: Resources = field(default_factory=Resources)
    # The most jobs of this capability one worker runs at once (None: worker capacity).
    concurrency: int | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def advert(self) -> dict[str, str]:
        return {"type": self.type, **self.labels}


class App:
    def __init__(self, name: str = "jetfleet") -> None:
        self.name = name
        self.capabilities: dict[str, CapabilitySpec] = {}

    def capability(self, type: str, *, gpus: int = 0, gpu_memory_mb: int = 0,
                   cpu_slots: int = 0, concurrency: int | None = None,
                   **labels: object) -> Callable[[Handler], Handler]:
        if not is_valid_capability_type(type):
            raise ValueError(f"capability type {type!r}: use dot-separated lower-case words")
        for key, value in labels.items():
            if not isinstance(value, str | int | float | bool) or key == "type":
                raise ValueError(f"capability label {key}={value!r}: labels are plain strings")

        def register(fn: Handler) -> Handler:
            if type in self.capabilities:
                raise ValueError(f"capability {type!r} is declared twice")
            self.capabilities[type] = CapabilitySpec(
                type=type, handler=fn, labels={k: str(v) for k, v in labels.items()},
                resources=Resources(gpus=gpus, gpu_memory_mb=gpu_memory_mb, cpu_slots=cpu_slots),
                concurrency=concurrency)
            return fn

        return register

    def include(self, other: App) -> App:
        for spec in other.capabilities.values():
            if spec.type in self.capabilities:
                raise ValueError(f"capability {spec.type!r} is declared twice")
            self.capabilities[spec.type] = spec
        return self
