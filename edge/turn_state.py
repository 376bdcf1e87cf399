"""What the gateway knows about one agent turn of a session: its timing marks (the
latency breakdown), its reply text and audio in order, and what the device played."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from schemas import AudioChunk


@dataclass
class TurnState:
    """What the gateway knows about one agent turn of a session."""

    turn_id: str
    speech_end_ms: int | None = None
    speech_end_ns: int | None = None  # wall clock when that audio reached the gateway
    decided_ns: int | None = None  # TurnEnded.created_ns
    committed_ns: int | None = None  # the commit of a tentative end (its second TurnEnded)
    held: bool = False  # tentatively ended: its audio waits for the commit
    transcript_ns: int | None = None
    first_text_ns: int | None = None
    llm_ttft_ms: float | None = None
    first_tts_ns: int | None = None
    first_sent_ns: int | None = None  # first audio byte sent to the device
    rule: str = ""
    continues: str = ""  # the dropped turn this one continues (same trace)
    continued: bool = False  # dropped: the user went on before hearing any of it
    trace_id: str = ""
    traceparent: str = ""  # the turn's trace context; its span id is the root span's
    speech_start_ns: int | None = None  # wall clock when the turn's speech reached us
    texts: dict[int, str] = field(default_factory=dict)  # reply text per seq
    pending: dict[tuple[int, int], AudioChunk] = field(default_factory=dict)
    next_part: tuple[int, int] = (0, 0)  # the (seq, part) to send next
    samples: dict[int, int] = field(default_factory=dict)  # samples sent per seq
    complete: set[int] = field(default_factory=set)  # seqs whose final part was sent
    sent_samples: int = 0
    sample_rate: int = 0
    announced: bool = False  # the "audio" message went out
    done: bool = False  # turn_done sent (all audio sent, or cut off)
    cancelled: bool = False
    played: int = 0  # samples the device reports having played
    played_event: asyncio.Event = field(default_factory=asyncio.Event)

    def latency_ms(self) -> dict[str, float]:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) / 1e6, 1)

        marks = {
            "turn_detect": ms(self.speech_end_ns, self.decided_ns),
            "turn_commit": ms(self.speech_end_ns, self.committed_ns),
            "asr": ms(self.decided_ns, self.transcript_ns),
            "llm_ttft": self.llm_ttft_ms,
            "llm_first_text": ms(self.transcript_ns, self.first_text_ns),
            "tts_first_chunk": ms(self.first_text_ns, self.first_tts_ns),
            "end_of_speech_to_first_audio": ms(self.speech_end_ns, self.first_sent_ns),
        }
        return {k: v for k, v in marks.items() if v is not None}

    def heard_text(self, played: int) -> str:
        """The reply text the user heard, given ``played`` samples of its audio."""
        words: list[str] = []
        left = played
        for seq in sorted(self.texts):
            text = self.texts[seq]
            total = self.samples.get(seq, 0)
            if seq in self.complete and left >= total:
                words.extend(text.split())
                left -= total
                continue
            if total and left > 0:  # part of this chunk was heard: its share of the words
                share = text.split()
                words.extend(share[: int(len(share) * min(1.0, left / total))])
            break
        return " ".join(words)
