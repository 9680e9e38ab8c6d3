"""Deterministic stand-ins for model output: words, embedding vectors, PNG images, WAV audio.

Everything is derived from a hash of the input, so the same request always gets the same
answer, and every payload is a valid file of its kind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import struct
import sys
import wave
import zlib
from array import array

CHARS_PER_TOKEN = 4
SPEECH_SAMPLE_RATE = 16_000
_SPEECH_SECONDS_PER_CHAR = 0.06  # about 15 characters per second of speech
_MAX_SPEECH_SECONDS = 10.0
_WORDS = (
    "the", "model", "answers", "with", "simulated", "tokens", "while", "the", "engine",
    "measures", "prefill", "decode", "batch", "queue", "latency", "throughput", "and",
    "cost", "across", "every", "replica", "it", "serves", "today",
)  # fmt: skip


def estimate_tokens(text: str) -> int:
    """Tokens in ``text`` at about four characters per token (at least one)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _digest(*parts: str | bytes, size: int = 32) -> bytes:
    hasher = hashlib.shake_256()
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
        hasher.update(b"\0")
    return hasher.digest(size)


def token_text(seed: str, index: int) -> str:
    """The ``index``-th generated token for a prompt with this ``seed``: one word and a space."""
    offset = int.from_bytes(_digest(seed, size=4), "big")
    return " " + _WORDS[(offset + index) % len(_WORDS)]


def generated_text(seed: str, tokens: int) -> str:
    """``tokens`` generated words for a prompt."""
    return "".join(token_text(seed, index) for index in range(tokens))


def fraction(*parts: str) -> float:
    """A number in [0, 1), a pure function of ``parts``."""
    return int.from_bytes(_digest(*parts, size=8), "big") / 2**64


def embedding(text: str, *, model: str, dimensions: int) -> list[float]:
    """A unit vector of ``dimensions`` floats, a pure function of model and text."""
    raw = _digest(model, text, size=4 * dimensions)
    values = [(word / 0x7FFFFFFF) - 1.0 for word in struct.unpack(f">{dimensions}I", raw)]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


def embedding_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format="base64"``: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def png(prompt: str, *, width: int, height: int) -> bytes:
    """A valid PNG of one colour chosen by the prompt (compresses to a few hundred bytes)."""
    red, green, blue = _digest(prompt, size=3)
    row = b"\x00" + bytes((red, green, blue)) * width  # filter byte 0, then RGB pixels
    pixels = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def speech_seconds(text: str) -> float:
    """How long the simulated voice takes to say ``text``."""
    return min(max(len(text) * _SPEECH_SECONDS_PER_CHAR, 0.25), _MAX_SPEECH_SECONDS)


def pcm16(text: str, *, voice: str) -> bytes:
    """Mono 16-bit little-endian PCM at 16 kHz: a quiet tone whose pitch depends on the voice."""
    pitch = 180.0 + _digest(voice, size=1)[0]
    count = int(speech_seconds(text) * SPEECH_SAMPLE_RATE)
    step = 2 * math.pi * pitch / SPEECH_SAMPLE_RATE
    samples = array("h", (int(3000 * math.sin(step * n)) for n in range(count)))
    if sys.byteorder == "big":  # WAV and OpenAI's pcm are little-endian
        samples.byteswap()
    return samples.tobytes()


def wav(text: str, *, voice: str) -> bytes:
    """A valid WAV file of :func:`pcm16`."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SPEECH_SAMPLE_RATE)
        out.writeframes(pcm16(text, voice=voice))
    return buffer.getvalue()


def audio_seconds(data: bytes) -> float:
    """The duration of an uploaded audio file: exact for WAV, else assumed 16 kB/s."""
    try:
        with wave.open(io.BytesIO(data), "rb") as source:
            return source.getnframes() / float(source.getframerate())
    except (wave.Error, EOFError):
        return len(data) / 16_000.0


def transcript(data: bytes, *, words: int) -> str:
    """A deterministic transcript of ``words`` words for an uploaded file."""
    seed = hashlib.sha256(data).hexdigest()
    text = generated_text(seed, words).strip()
    return text[:1].upper() + text[1:] + "."
