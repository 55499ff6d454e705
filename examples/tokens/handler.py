"""A ViperHandler subclass that overrides only `preprocess`: each request is text, tokenized here
into byte ids (what a tokenizer would do), batched as one int64 tensor. Inference inside one
lease, the default postprocess and the version in every answer all come from ViperHandler.

Archive it with the model:

    python -m serving_handlers.archive --name tokens --model-file examples/tokens/model.py \\
        --model-class ByteClassifier --handler examples/tokens/handler.py --export-path model_store

and ask: curl -H "Authorization: Bearer $KEY" -d '{"text": "hello"}' http://127.0.0.1:8080/predictions/tokens
"""

import json

import torch

from serving_handlers import ViperHandler

MAX_TOKENS = 512


def byte_ids(text: str) -> list[int]:
    """The tokenizer: UTF-8 bytes shifted by one (0 pads), at most MAX_TOKENS."""
    return [byte + 1 for byte in text.encode()[:MAX_TOKENS]] or [0]


class TextHandler(ViperHandler):
    """Serves ByteClassifier on text requests: `{"text": "..."}` or the raw text as the body."""

    def preprocess(self, data):
        texts = []
        for request in data:
            body = request.get("body", request.get("data"))
            if isinstance(body, (bytes, bytearray)):
                body = body.decode()
            if isinstance(body, str) and body.startswith("{"):
                body = json.loads(body)
            texts.append(body["text"] if isinstance(body, dict) else str(body))
        ids = [byte_ids(text) for text in texts]
        length = max(len(row) for row in ids)
        return torch.tensor([row + [0] * (length - len(row)) for row in ids], dtype=torch.int64)
