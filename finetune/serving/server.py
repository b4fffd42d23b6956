"""Run the OpenAI-compatible server with uvicorn (`wenmai serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.serving.app import create_app


def serve(model_source: str | Path, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve `model_source` on host:port until interrupted; `options` are those of `create_app`.

    Off loopback the server refuses to start without an API key (`api_key_env`). It speaks plain HTTP: on a
    network, put it behind a TLS proxy so the key and the conversations are encrypted.
    """
    import uvicorn

    app = create_app(model_source, host=host, **options)
    uvicorn.run(app, host=host, port=port, server_header=False, log_level="info")
