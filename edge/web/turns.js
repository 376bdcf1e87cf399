// Each turn as the device sees it, kept as edge/client_session.py keeps it for
// `voicebus talk`: transcript, reply text, the turn's audio fed to the speaker, and the
// `played` reports the speaker's progress drives. After a barge-in the gateway stores
// only what the user heard, so those counts must be what was really played: sent
// while a turn plays, at its end, and on a flush (what was played when it stopped).

const REPORT_EVERY_MS = 200;
const KEEP_REPORTS = 100;

function newTurn(id) {
  return {
    id, transcript: "", finalTranscript: false, replies: new Map(), reply: "",
    received: 0, played: 0, reported: 0, lastReportAt: 0, carry: null,
    done: false, flushed: false, finished: false,
    interrupted: false, continued: false, continues: "", latency: {}, traceId: "",
  };
}

export class Turns {
  // speaker: audio.js Speaker; send(message): to the gateway; onChange(turn): redraw.
  constructor(speaker, send, onChange) {
    this.speaker = speaker;
    this.send = send;
    this.onChange = onChange;
    this.turns = new Map(); // in order of first mention
    this.audioTurn = null; // the turn the next binary frames belong to
    this.reports = []; // the `played` messages sent, newest last (shown to tests)
    this.speakerCounts = {}; // the speaker's own last count per turn (shown to tests)
  }

  get(id) {
    let turn = this.turns.get(id);
    if (!turn) this.turns.set(id, (turn = newTurn(id)));
    return turn;
  }

  get playedSamples() {
    let total = 0;
    for (const turn of this.turns.values()) total += turn.played;
    return total;
  }

  onControl(message) {
    const id = message.turn_id;
    if (typeof id !== "string") return;
    const turn = this.get(id);
    switch (message.type) {
      case "speech_started":
        turn.continues = message.continues || "";
        break;
      case "transcript": {
        const final = message.final !== false;
        if (final || !turn.finalTranscript) {
          turn.transcript = String(message.text ?? "");
          turn.finalTranscript = final;
        }
        break;
      }
      case "reply": {
        const seq = Number.isInteger(message.seq) ? message.seq : turn.replies.size;
        turn.replies.set(seq, String(message.text ?? "").trim());
        turn.reply = [...turn.replies.entries()].sort((a, b) => a[0] - b[0])
          .map(([, text]) => text).filter(Boolean).join(" ");
        break;
      }
      case "audio":
        this.audioTurn = id;
        break;
      case "flush":
        this.flush(turn, message.reason !== "continued");
        break;
      case "turn_done":
        turn.done = true;
        turn.continued = Boolean(message.continued);
        turn.latency = message.latency_ms || {};
        turn.traceId = message.trace_id || "";
        this.speaker.end(id); // no more audio: play the tail without waiting to prebuffer
        if (message.interrupted || turn.continued) {
          this.flush(turn, !turn.continued); // cut off: whatever is queued must not play
        } else {
          this.progress(turn);
        }
        break;
      default:
        return;
    }
    this.onChange(turn);
  }

  onAudio(buffer) {
    const turn = this.audioTurn ? this.turns.get(this.audioTurn) : undefined;
    if (!turn || turn.flushed) return;
    let bytes = new Uint8Array(buffer);
    if (turn.carry) { // half a sample was split across two frames
      const joined = new Uint8Array(turn.carry.length + bytes.length);
      joined.set(turn.carry);
      joined.set(bytes, turn.carry.length);
      bytes = joined;
    }
    const whole = bytes.length - (bytes.length % 2);
    turn.carry = whole < bytes.length ? bytes.slice(whole) : null;
    if (!whole) return;
    const samples = new Int16Array(bytes.slice(0, whole).buffer);
    turn.received += samples.length;
    this.speaker.play(turn.id, samples);
  }

  // The speaker's progress: {turn: samples played so far}.
  onProgress(played) {
    this.speakerCounts = played;
    for (const [id, samples] of Object.entries(played)) {
      const turn = this.turns.get(id);
      if (!turn || turn.flushed) continue; // a flushed turn's count is final
      turn.played = samples;
      this.progress(turn);
    }
  }

  progress(turn) {
    if (turn.finished || turn.flushed) return;
    if (turn.done && turn.played >= turn.received) {
      turn.finished = true;
      if (turn.received) this.report(turn); // the end of the turn's playback
      this.onChange(turn);
    } else if (turn.played !== turn.reported &&
               performance.now() - turn.lastReportAt >= REPORT_EVERY_MS) {
      this.report(turn);
    }
  }

  async flush(turn, interrupted) {
    if (turn.flushed) return;
    turn.flushed = true; // from now on its audio frames are dropped
    turn.interrupted = interrupted;
    turn.played = await this.speaker.flush(turn.id);
    turn.finished = true;
    this.report(turn);
    this.onChange(turn);
  }

  report(turn) {
    turn.reported = turn.played;
    turn.lastReportAt = performance.now();
    this.send({ type: "played", turn_id: turn.id, samples: turn.played });
    this.reports.push({ turn: turn.id, samples: turn.played });
    if (this.reports.length > KEEP_REPORTS) this.reports.shift();
  }

  // The connection is gone: its turns end with it (the gateway cancels the live one).
  reset() {
    this.speaker.flushAll();
    for (const turn of this.turns.values()) turn.finished = true;
    this.audioTurn = null;
  }

  summary() {
    return [...this.turns.values()].map((t) => ({
      id: t.id, transcript: t.transcript, reply: t.reply, received: t.received,
      played: t.played, speakerPlayed: this.speakerCounts[t.id] ?? 0, reported: t.reported, done: t.done, flushed: t.flushed,
      finished: t.finished, interrupted: t.interrupted, continued: t.continued,
      latency: t.latency,
    }));
  }
}
