// The agent's voice, played on the audio thread from a jitter buffer.
//
// The page runs this in an AudioContext at the gateway's out_rate, so one sample in is
// one sample out and "played" counts are exact: they are what the gateway stores as
// heard after a barge-in. Chunks arrive in bursts over the network; playback starts
// once PREBUFFER_S is queued (or the turn's audio is complete), and an underrun fades
// out instead of dropping to zero, so neither a late chunk nor a flush clicks.
//
// Messages from the page:  {type: "audio", turn, samples: Int16Array}
//                          {type: "end", turn}    all of the turn's audio was sent
//                          {type: "flush", turn}  drop the turn's queued audio now
//                          {type: "flush-all"}    the connection is gone
// Messages to the page:    {type: "progress", played: {turn: n}, buffered}
//                          {type: "flushed", turn, played}

const PREBUFFER_S = 0.1;
const FADE_SAMPLES = 64; // ~3 ms at 24 kHz: long enough to remove a click, too short to hear
const REPORT_EVERY_BLOCKS = 8; // ~40 ms at 24 kHz

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // [{turn, data: Float32Array, offset}] in play order
    this.buffered = 0; // samples queued
    this.ended = new Set(); // turns whose audio is complete
    this.played = new Map(); // turn -> samples played
    this.changed = false;
    this.playing = false;
    this.gain = 0; // ramps 0 -> 1 on start, so a start mid-waveform does not click
    this.last = 0; // the last sample out, decayed to 0 on an underrun or a flush
    this.blocks = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(message) {
    if (message.type === "audio") {
      const data = new Float32Array(message.samples.length);
      for (let i = 0; i < data.length; i++) data[i] = message.samples[i] / 32768;
      this.queue.push({ turn: message.turn, data, offset: 0 });
      this.buffered += data.length;
    } else if (message.type === "end") {
      this.ended.add(message.turn);
    } else if (message.type === "flush") {
      this.drop((chunk) => chunk.turn === message.turn);
      // Fade out from where it was cut; whatever plays next (the next turn) fades in.
      this.playing = false;
      this.port.postMessage({
        type: "flushed", turn: message.turn, played: this.played.get(message.turn) || 0,
      });
    } else if (message.type === "flush-all") {
      this.drop(() => true);
      this.playing = false;
    }
  }

  drop(matches) {
    this.queue = this.queue.filter((chunk) => {
      if (!matches(chunk)) return true;
      this.buffered -= chunk.data.length - chunk.offset;
      return false;
    });
  }

  // Start only with enough queued to ride out network jitter, unless nothing more of
  // the turn at the head is coming (a short reply, or the tail of one).
  ready() {
    if (this.queue.length === 0) return false;
    return this.buffered >= PREBUFFER_S * sampleRate || this.ended.has(this.queue[0].turn);
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.ready()) {
      this.playing = true;
      this.gain = 0;
    }
    for (let i = 0; i < out.length; i++) {
      const chunk = this.playing ? this.queue[0] : undefined;
      if (chunk === undefined) {
        this.playing = false; // underrun (or idle): wait for the buffer to refill
        this.last *= 0.9;
        out[i] = this.last;
        continue;
      }
      this.gain = Math.min(1, this.gain + 1 / FADE_SAMPLES);
      this.last = chunk.data[chunk.offset++] * this.gain;
      out[i] = this.last;
      this.buffered--;
      this.played.set(chunk.turn, (this.played.get(chunk.turn) || 0) + 1);
      this.changed = true;
      if (chunk.offset === chunk.data.length) this.queue.shift();
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    // Report often while playing, and at once when the queue runs dry (the end of a turn).
    this.blocks++;
    if (this.changed && (this.blocks % REPORT_EVERY_BLOCKS === 0 || this.queue.length === 0)) {
      this.changed = false;
      this.port.postMessage({
        type: "progress", played: Object.fromEntries(this.played), buffered: this.buffered,
      });
    }
    return true;
  }
}

registerProcessor("voicebus-player", PlayerProcessor);
