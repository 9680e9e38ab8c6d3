"""A conversation trace with shared prefixes: sessions whose turns carry their history.

Azure's conversation trace has arrivals and token counts but no prompt contents, so which
requests share a prefix is unknown. This module lays a documented model of multi-turn
chat over it, the shape that makes prefix caching pay in conversation traffic:

* **Arrivals and sizes are the trace's.** Each trace request is one turn: its
  ``input_tokens`` are the turn's new user message, its ``output_tokens`` the reply.
* **Sessions.** A turn starts a new session with probability ``1 / mean_turns``
  (:data:`MEAN_TURNS`), else it continues one of the :data:`OPEN_SESSIONS` most recently
  active sessions, drawn uniformly; a session ends after :data:`MAX_TURNS` turns or when
  its next prompt would pass ``max_context_tokens``.
* **Prompts grow.** Turn ``k``'s prompt is the session's system prompt, every earlier
  turn's message and reply, and the new message (vLLM's chat template adds little).
* **System prompts are shared.** A session's system prompt is one of
  :data:`SYSTEM_PROMPTS`, drawn uniformly, each :data:`SYSTEM_TOKENS` long: the
  application's instructions, identical for every session that uses them.
* **Blocks.** The prompt is cut into 512-token blocks (``catalog.prefix``). A block
  wholly inside the system prompt is named by (system prompt, position) and so shared
  across sessions; any other block by (session, position), shared by the session's
  later turns, since a conversation only appends. The ids play the part of Mooncake's
  ``hash_ids``.

Deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from autoscaler.sim.trace import TraceRequest
from catalog.prefix import BLOCK_TOKENS

MEAN_TURNS = 4.0
"""Mean turns per session (a new session with probability 1/4 at each arrival)."""

MAX_TURNS = 16
OPEN_SESSIONS = 64
"""Sessions a continuing turn may belong to: the most recently active ones."""

SYSTEM_PROMPTS = 16
SYSTEM_TOKENS = 1536
"""Three blocks of instructions shared by every session on that system prompt."""

_SESSION_BASE = 1 << 40
_POSITIONS = 1 << 16


@dataclass(slots=True)
class _Session:
    number: int
    system: int
    context: int = SYSTEM_TOKENS
    turns: int = 0
    last: list[int] = field(default_factory=list)


def conversation_sessions(
    requests: Sequence[TraceRequest],
    *,
    seed: int,
    max_context_tokens: int,
    mean_turns: float = MEAN_TURNS,
) -> list[TraceRequest]:
    """``requests`` as turns of sessions (the module's model), with their prompt blocks."""
    if mean_turns < 1:
        raise ValueError(f"mean_turns must be >= 1, got {mean_turns}")
    rng = random.Random(seed)
    open_sessions: list[_Session] = []
    started = 0
    out: list[TraceRequest] = []
    for request in requests:
        session = None
        if open_sessions and rng.random() >= 1.0 / mean_turns:
            session = rng.choice(open_sessions)
            if session.context + request.input_tokens + request.output_tokens > max_context_tokens:
                open_sessions.remove(session)
                session = None
        if session is None:
            started += 1
            session = _Session(number=started, system=rng.randrange(SYSTEM_PROMPTS))
            open_sessions.append(session)
            if len(open_sessions) > OPEN_SESSIONS:
                open_sessions.pop(0)
        else:
            open_sessions.remove(session)
            open_sessions.append(session)  # most recently active last
        prompt = session.context + request.input_tokens
        out.append(replace(request, input_tokens=prompt, hash_ids=_blocks(session, prompt)))
        session.context = prompt + request.output_tokens
        session.turns += 1
        if session.turns >= MAX_TURNS:
            open_sessions.remove(session)
    return out


def _blocks(session: _Session, prompt_tokens: int) -> tuple[int, ...]:
    count = -(-prompt_tokens // BLOCK_TOKENS)
    shared = SYSTEM_TOKENS // BLOCK_TOKENS
    return tuple(
        session.system * _POSITIONS + b
        if b < shared
        else _SESSION_BASE + session.number * _POSITIONS + b
        for b in range(count)
    )
