"""Call the chain from a client: put an image, call image.thumbnail, print
what came back and the report it wrote.

    python run.py [IMAGE]          # default: the drawn test card

JETFLEET_NATS_URL points at the fleet (`jetfleet up` prints it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from bus import codec
from sdk import Client
from sdk.objects import Objects


async def main(image: Path | None) -> int:
    from testcard import testcard

    data = await asyncio.to_thread(image.read_bytes) if image else testcard()
    async with await Client.connect() as fleet:
        objects = Objects(fleet)
        ref = await objects.put(data, name=f"inputs/{image.name if image else 'testcard.jpg'}",
                                ttl=3600)
        result = await fleet.call("image.thumbnail", {"image": codec.to_builtins(ref)},
                                  timeout=120)
        print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=2))
        print((await objects.get(result["report"])).decode())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)))
