"""`wenmai serve`: an OpenAI-compatible chat server with AIGC labels, an output filter and continuous batching."""

from finetune.serving.app import create_app
from finetune.serving.server import serve

__all__ = ["create_app", "serve"]
