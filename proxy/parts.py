"""Content parts a chat message may carry: OpenAI's, in shapes whose cost the prompt bound covers.

LiteLLM fetches what some shapes point at (a file by URL, a PDF behind an image part, an Anthropic
`document`) and the model reads it at a cost nobody can know in advance, so those are refused.
"""

from __future__ import annotations

from typing import Any

from .tokens import IMAGE_PARTS


def _inline(data: Any) -> bool:
    """Data carried in the body (base64, a data: URI), counted in the prompt bound as its text; not a URL
    (http, gs, s3, ...), which LiteLLM fetches and the model reads at a cost nobody can know in advance."""
    return isinstance(data, str) and "://" not in data[:64]


def bounded_image(image: Any) -> bool:
    """An image is counted as an image; a PDF or text behind an image part (LiteLLM turns non-image data
    URIs into documents, and takes `format`, or on its Gemini path `mime_type` or `content_type`, as the
    media type of what it fetches) could cost the model's whole context."""
    if isinstance(image, dict):
        for key in _MEDIA_TYPE_KEYS:
            media = image.get(key)
            if media is not None and not (isinstance(media, str) and media.startswith("image/")):
                return False
        image = image.get("url")
    return isinstance(image, str) and image.startswith(("https://", "http://", "data:image/"))


_MEDIA_TYPE_KEYS = ("format", "mime_type", "content_type")


def bounded_part(part: Any) -> bool:
    """The content parts of OpenAI's chat API, each in a shape whose cost the prompt bound covers; any
    other type (an Anthropic `document`, a `video_url`, ...) could bring a document the bound never saw."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        return False
    kind = part["type"]
    if kind in ("text", "refusal"):
        return isinstance(part.get(kind), str)
    if kind in IMAGE_PARTS:
        return bounded_image(part.get("image_url", part.get("input_image")))
    if kind == "file":
        # A file id names a file stored under the proxy's own key: not the caller's, and of no known size.
        file = part.get("file")
        return isinstance(file, dict) and "file_id" not in file and _inline(file.get("file_data"))
    if kind == "input_audio":
        audio = part.get("input_audio")
        return isinstance(audio, dict) and _inline(audio.get("data"))
    return False
