"""A custom adapter: the app's JSON logs to stdout, and its errors to a chat webhook.

The image's command is ``python3 -m shop_pipeline`` (docs/library.md); the paths and the
webhook's address come from the environment the Pod gives it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp

from podpatterns.adapter import Files, Pipeline, Rename
from podpatterns.adapter.config import SinkConfig
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from podpatterns.runtime import Runtime, RuntimeConfig
from podpatterns.runtime.process import serve


class WebhookSink:
    """Posts the error records of each batch to a chat webhook: a sink of your own."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        self.url = url
        self.posted = 0
        self.rejected = 0
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def send(self, records: list[dict[str, Any]]) -> None:
        errors = [r for r in records if r.get("level") == "error"]
        if errors and self.session is not None:
            text = "\n".join(f"{r.get('file')}: {r.get('message')}" for r in errors)
            async with self.session.post(self.url, json={"text": text}) as resp:
                if 400 <= resp.status < 500 and resp.status not in (408, 429):
                    self.rejected += len(errors)  # never taken: holding on would stop the rest
                    return
                resp.raise_for_status()  # raising: not accepted, the batch is sent again
            self.posted += len(errors)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def collect(self) -> dict[str, float]:
        return {"posted": self.posted, "rejected": self.rejected}


def build() -> Pipeline:
    env = os.environ
    if not env.get("WEBHOOK_URL"):
        raise ConfigError("WEBHOOK_URL: missing (the chat webhook's address)")
    return Pipeline(
        sources=[Files(paths=[env.get("LOGS", "/var/log/app/*.log")])],
        parse="json",
        transforms=[Rename("msg", "message")],
        sinks=[SinkConfig(name="stdout", kind="stdout"), WebhookSink(env["WEBHOOK_URL"])],
        checkpoint_dir=Path(env.get("STATE_DIR", "/var/lib/adapter")),
    )


def main() -> int:
    """Run until SIGTERM, with the admin server (probes, /metrics) on ADMIN_PORT."""
    runtime = RuntimeConfig(admin=HostPort("127.0.0.1", int(os.environ.get("ADMIN_PORT", "9902"))))
    return serve(runtime, lambda: Runtime(runtime, [build()]))


if __name__ == "__main__":
    raise SystemExit(main())
