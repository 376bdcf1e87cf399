"""A reply that a worker began and did not finish. It died, froze past its lease, or
raised mid-reply. The worker that takes the turn over goes on with the *same* reply,
or ends it where it stopped. It never splices two different replies.

The runtime writes each output ordinal of an entry once, so the new handling's first
chunks are not written again. Its text would go out from the first chunk the dead
worker had not written. A model that samples (temperature > 0; llama.cpp's seed is
not enough, measured) rarely says the same thing twice. The user would hear the
start of one answer and the end of another. So the new reply's chunks are checked
against the chunks already on the session's out stream:

* all of them the same: the reply goes on from there. That is what a deterministic
  model gives;
* one differs: the new stream is closed, and the reply ends with what the user
  already has. Memory keeps that text. A short answer beats a spliced one;
* the old reply had ended (the worker died between its last chunk and its ack):
  nothing is asked of the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from schemas import TextChunk, Transcript
from workers.runtime.bus import newest_first

LOOK_BACK = 4096  # out entries at most: past the out stream's usual length (redis.maxlen.out)


@dataclass(frozen=True)
class Said:
    """The chunks of a turn's reply already on the out stream, in order from seq 0."""

    texts: tuple[str, ...] = ()
    ended: bool = False  # its last chunk is among them

    def matches(self, seq: int, text: str, last: bool) -> bool:
        """Is chunk ``seq`` of a new reply the one already said (or past it)?"""
        if seq >= len(self.texts):
            return True
        if last and not (self.ended and seq == len(self.texts) - 1):
            return False  # the new reply ends sooner than the one said
        return text.split() == self.texts[seq].split()


async def said_before(redis: Redis, out_stream: str, turn_id: str) -> Said:
    """What the session's out stream holds of ``turn_id``'s reply: read newest first,
    back to the turn's transcript (the reply cannot be older than that)."""
    chunks: dict[int, TextChunk] = {}
    async for event in newest_first(redis, out_stream, LOOK_BACK):
        if isinstance(event, TextChunk) and event.turn_id == turn_id:
            chunks.setdefault(event.seq, event)
        elif isinstance(event, Transcript) and event.turn_id == turn_id and event.final:
            break
    return _contiguous(chunks)


def _contiguous(chunks: dict[int, TextChunk]) -> Said:
    texts: list[str] = []
    ended = False
    while len(texts) in chunks and not ended:
        chunk = chunks[len(texts)]
        texts.append(chunk.text)
        ended = chunk.last
    return Said(tuple(texts), ended)
