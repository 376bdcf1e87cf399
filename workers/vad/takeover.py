"""What a VAD that takes a session over mid-utterance learns from the session's out
stream: the turn its dead predecessor had started and not ended.

The frames of that turn were left pending (``HybridVad.keeps_pending``), so the new
owner hears the utterance again and ends it; with the turn's id and trace it ends
*that* turn, the one the device saw start, instead of a new one the device never
hears the end of.
"""

from __future__ import annotations

from redis.asyncio import Redis

from schemas import SpeechStarted, TurnEnded
from workers.runtime.bus import newest_first

LOOK_BACK = 256  # out entries: a reply's audio chunks may follow the last turn's end


async def open_turn(redis: Redis, out_stream: str) -> SpeechStarted | None:
    """The newest turn start on ``out_stream`` with no turn end after it, if any."""
    async for event in newest_first(redis, out_stream, LOOK_BACK):
        if isinstance(event, TurnEnded):
            return None
        if isinstance(event, SpeechStarted):
            return event
    return None
