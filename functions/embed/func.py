"""embed handler: tokenise one text, pad it to a length bucket, answer a 384-dim unit vector.

Request data `{"text": str}`. Model inputs `input_ids` and `attention_mask`, int64 [1, bucket],
where bucket is the smallest of BUCKETS that holds the tokens (truncated at 256), so the batcher
can group requests of equal shape. Padding does not change the embedding (masked mean pooling).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.contract import Batching, Feeds, FunctionConfig, Scaling
from shared.errors import InvalidInput
from shared.validation import json_kind

MAX_TOKENS = 256
MAX_CHARS = 10_000
BUCKETS = (16, 32, 64, 128, 256)
TOKENIZER_FILE = "embed/1/tokenizer.json"


def bucket_for(length: int) -> int:
    """The smallest bucket that holds `length` tokens."""
    for bucket in BUCKETS:
        if length <= bucket:
            return bucket
    raise ValueError(f"{length} tokens exceed the largest bucket {BUCKETS[-1]}")


# The sample stream of `onnxfn up`.
SENTENCES = (
    "Serverless functions scale to zero when no events arrive.",
    "A Kafka broker keeps every event until its consumers have seen it.",
    "The digits model reads an eight by eight image.",
    "Triggers deliver each event to the function that wants it.",
    "Dead letters keep the events nobody could process.",
)


class EmbedHandler:
    """Embed one text per event with all-MiniLM-L6-v2."""

    def __init__(self) -> None:
        self.config = FunctionConfig(
            name="embed",
            accepts=("dev.onnxfn.embed.request",),
            result_types=("dev.onnxfn.embed.result",),
            model_file="embed/1/model.onnx",
            model_version="1",
            batching=Batching(max_batch_size=32, queue_capacity=512),
            scaling=Scaling(
                min_scale=0,
                max_scale=4,
                initial_scale=1,
                retention_period="120s",
                cpu="2",
                memory="1Gi",
                timeout_seconds=60,
            ),
            workers=2,
            concurrency=16,
        )
        self._tokenizer: Any = None

    def setup(self, model_dir: Path) -> None:
        """Load the tokenizer beside the model: truncation at 256 tokens, no padding."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(model_dir) / TOKENIZER_FILE))
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer = tokenizer

    def preprocess(self, data: Any) -> Feeds:
        """`{"text": str}` -> `input_ids`, `attention_mask` int64 [1, bucket]."""
        if not isinstance(data, dict):
            raise InvalidInput([f"data: expected a JSON object with 'text', got {json_kind(data)}"])
        problems: list[str] = []
        text = data.get("text")
        if "text" not in data:
            problems.append("missing field 'text'")
        elif not isinstance(text, str):
            problems.append(f"text: expected a string, got {json_kind(text)}")
        elif not text.strip():
            problems.append("text: empty")
        elif len(text) > MAX_CHARS:
            problems.append(f"text: {len(text)} characters, more than {MAX_CHARS}")
        if problems:
            raise InvalidInput(problems)
        if self._tokenizer is None:
            raise RuntimeError("embed: setup(model_dir) was not called (no tokenizer)")
        ids = self._tokenizer.encode(text).ids
        length = len(ids)
        bucket = bucket_for(length)
        input_ids = np.zeros((1, bucket), dtype=np.int64)
        attention_mask = np.zeros((1, bucket), dtype=np.int64)
        input_ids[0, :length] = ids
        attention_mask[0, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def postprocess(self, outputs: Mapping[str, np.ndarray], data: Any) -> dict[str, Any]:
        """`embedding` [384] -> `{"embedding": [384 floats]}`."""
        return {"embedding": np.asarray(outputs["embedding"], dtype=np.float32).reshape(-1).tolist()}

    def example(self) -> dict[str, Any]:
        """A sentence for warm-up and benchmarks."""
        return {"text": "Serverless functions scale to zero when no events arrive."}

    def samples(self, count: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """A few sentences about this system (at most one of each)."""
        return [({"text": text}, {}) for text in SENTENCES[:count]]


def new() -> EmbedHandler:
    """The embed handler (the tokenizer loads in `setup`)."""
    return EmbedHandler()
