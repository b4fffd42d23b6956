"""Run the review app with uvicorn (`wenmai review serve`)."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.net import is_loopback
from finetune.review_app.app import create_app


def serve(
    db: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    secret_key: str | None = None,
    export_dir: Path = Path("review-exports"),
    secure_cookies: bool = False,
) -> None:
    """Serve the review app on host:port until interrupted; warns when it listens beyond this machine.

    The app speaks plain HTTP. On a network, put it behind a TLS proxy and pass `secure_cookies=True`; uvicorn
    then takes the client address (for the sign-in limit) from the proxy's X-Forwarded-For when the proxy runs
    on this machine.
    """
    import uvicorn

    if not is_loopback(host):
        print(
            f"warning: the review app listens on {host}:{port} and speaks plain HTTP: passwords and session cookies "
            "would cross the network unencrypted. Put it behind a TLS proxy (nginx, Caddy) and run it with "
            "--secure-cookies.",
            file=sys.stderr,
        )
    app = create_app(db, secret_key=secret_key, export_dir=export_dir, secure_cookies=secure_cookies)
    uvicorn.run(app, host=host, port=port, proxy_headers=True, server_header=False)
