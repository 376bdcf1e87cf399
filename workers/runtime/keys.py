"""Names of every Redis key voicebus uses, in one place.

Keys of one session carry a hash tag so that they live in one Redis Cluster slot:
the session's *bucket* (``{s17}``, one of ``SESSION_BUCKETS``), not its id. A worker
reads the streams of many sessions at once, and on a cluster one read may only
name keys of one slot; with buckets a worker's blocking reads are bounded by the
number of buckets, not one connection per session. Keys of one user carry
``{user_id}``. Every key starts with the configured prefix, so several deployments
(or tests) can share one Redis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from workers.config import RedisConfig

# Fixed, not configured: a session's key names must not change while it lives. 32
# spreads sessions over the masters of a cluster (32 slots) and bounds a worker's
# concurrent blocking reads on a cluster at 32 + its job shards.
SESSION_BUCKETS = 32

StreamKind = Literal["audio", "queue", "out", "control", "sessions", "dead_letter"]


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "vb"
    queue_shards: int = 1  # streams per job stage's queue (``redis.queue_shards``)

    @classmethod
    def of(cls, redis: RedisConfig) -> Keys:
        return cls(redis.key_prefix, redis.queue_shards)

    def _session(self, session_id: str, what: str) -> str:
        bucket = zlib.crc32(session_id.encode()) % SESSION_BUCKETS
        return f"{self.prefix}:{{s{bucket}}}:{session_id}:{what}"

    # -- streams --------------------------------------------------------
    def sessions(self) -> str:
        """Announcements of live sessions; the session-affine stage claims them."""
        return f"{self.prefix}:sessions"

    def audio(self, session_id: str) -> str:
        """A session's microphone frames, in capture order."""
        return self._session(session_id, "audio")

    def out(self, session_id: str) -> str:
        """What goes back to the session's device (audio chunks, transcripts...)."""
        return self._session(session_id, "out")

    def queue(self, stage: str, shard: int = 0) -> str:
        """Shard ``shard`` of a job stage's work queue. Shard 0 keeps the unsharded name,
        so a deployment that adds shards keeps its backlog where its workers read."""
        return f"{self.prefix}:q:{stage}" + (f":{shard}" if shard else "")

    def queues(self, stage: str) -> list[str]:
        """Every shard of a job stage's queue (what its workers read)."""
        return [self.queue(stage, shard) for shard in range(self.queue_shards)]

    def job_queue(self, stage: str, session_id: str) -> str:
        """The shard a session's jobs for ``stage`` go to: always the same one, so they
        keep their order. A stable hash (CRC-32), not Python's per-process salted one."""
        return self.queue(stage, zlib.crc32(session_id.encode()) % self.queue_shards)

    def control(self) -> str:
        """The control lane: cancels never wait behind audio or jobs."""
        return f"{self.prefix}:control"

    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    # -- plain keys -----------------------------------------------------
    def cancelled(self, session_id: str) -> str:
        """Hash of the session's cancelled turn ids -> reason."""
        return self._session(session_id, "cancelled")

    def active_turn(self, session_id: str) -> str:
        """The agent turn being prepared or played (barge-in cancels it); the gateway
        deletes it when the last audio of the turn has been played."""
        return self._session(session_id, "active_turn")

    def audible(self, session_id: str) -> str:
        """``"<turn_id> <wall ns>"``: the agent turn whose first audio the gateway sent to
        the device, and when (speech after that, past a grace time, is a barge-in)."""
        return self._session(session_id, "audible")

    def asr_result(self, session_id: str, turn_id: str, speech_end_ms: int) -> str:
        """A transcript parked between a turn's speculative and final TurnEnded. The
        speech end is part of it: if the user went on, the final audio differs."""
        return self._session(session_id, f"asr:{turn_id}:{speech_end_ms}")

    def user_messages(self, user_id: str) -> str:
        """A user's recent conversation (a list), across sessions."""
        return f"{self.prefix}:user:{{{user_id}}}:messages"

    def user_summary(self, user_id: str) -> str:
        """The summary of a user's older conversation."""
        return f"{self.prefix}:user:{{{user_id}}}:summary"

    def user_turn_stored(self, user_id: str, turn_id: str, role: str) -> str:
        """Set once a turn's message of ``role`` is stored: a redelivered turn does not
        store it twice."""
        return f"{self.prefix}:user:{{{user_id}}}:stored:{turn_id}:{role}"

    def user_turn_heard(self, user_id: str, turn_id: str) -> str:
        """What the user heard of an interrupted reply, when it is known before the
        reply is stored (the gateway reports playback; the LLM stage stores the reply)."""
        return f"{self.prefix}:user:{{{user_id}}}:heard:{turn_id}"

    def user_pauses(self, user_id: str) -> str:
        """A user's learned mid-turn pause length (adaptive turn detection)."""
        return f"{self.prefix}:user:{{{user_id}}}:pauses"

    def user_window(self, user_id: str) -> str:
        """Where a user's prompt window starts and what the last prompt held
        (``workers.llm.prompt_window``): the next prompt keeps its prefix."""
        return f"{self.prefix}:user:{{{user_id}}}:window"

    def user_summarizing(self, user_id: str) -> str:
        """A lock: one worker at a time summarizes a user's conversation."""
        return f"{self.prefix}:user:{{{user_id}}}:summarizing"

    def llm_turn_started(self) -> str:
        """When an LLM worker last started a live turn (a background summary waits for a
        quiet moment and gives way to live turns)."""
        return f"{self.prefix}:llm:turn_started"

    def turn_latency(self) -> str:
        """One entry per finished turn with its latency breakdown (the gateway writes it,
        ``voicebus status`` reads the recent window). Capped; not a work stream."""
        return f"{self.prefix}:metrics:turns"

    def alive(self, consumer: str) -> str:
        """Present while the consumer's process lives (a heartbeat with a short TTL)."""
        return f"{self.prefix}:alive:{consumer}"

    def dedup(self, output: str, group: str, source: str, entry_id: str) -> str:
        """Which outputs of one input entry were already written to ``output``'s slot
        (``workers.runtime.bus``): it carries the output stream's hash tag, so the write
        script touches one slot on a cluster."""
        return f"{self.prefix}:dedup:{{{slot_tag(output)}}}:{group}:{source}:{entry_id}"

    def pattern(self) -> str:
        return f"{self.prefix}:*"

    def kind(self, stream: str) -> StreamKind | None:
        """Which kind of stream a key is, or None if it is not one of ours."""
        if not stream.startswith(self.prefix + ":"):
            return None
        rest = stream[len(self.prefix) + 1 :]
        if rest == "sessions":
            return "sessions"
        if rest == "control":
            return "control"
        if rest == "dead":
            return "dead_letter"
        if rest.startswith("q:"):
            stage, _, shard = rest[2:].partition(":")
            if stage and (not shard or shard.isdigit()):
                return "queue"
        if rest.startswith("{") and "}:" in rest:
            suffix = rest.rsplit(":", 1)[1]
            if suffix == "audio":
                return "audio"
            if suffix == "out":
                return "out"
        return None


def slot_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key`` to pick its slot: the first non-empty
    ``{...}``, else the whole name. Keys with equal tags share a slot."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key
