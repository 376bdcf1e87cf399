// The microphone, cut on the audio thread into 20 ms PCM16 frames at the context's own
// rate (44.1 or 48 kHz on most devices): the page declares that rate in `start` and
// the gateway resamples, which is better than a quick resampler here (no aliasing).
//
// Messages from the page: {type: "mute", muted}  push to talk: silence while released.
// Messages to the page:   an ArrayBuffer per frame (PCM16, little-endian: the byte
//                         order of every platform browsers run on).

const FRAME_S = 0.02;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frameLength = Math.round(sampleRate * FRAME_S);
    this.frame = new Int16Array(this.frameLength);
    this.filled = 0;
    this.muted = false;
    this.port.onmessage = (event) => {
      if (event.data.type === "mute") this.muted = event.data.muted;
    };
  }

  process(inputs) {
    const input = inputs[0][0];
    // Muted or no input, frames still flow (as silence): the session's audio clock keeps
    // running and the gateway does not close it as idle.
    const length = input ? input.length : 128;
    for (let i = 0; i < length; i++) {
      const x = this.muted || !input ? 0 : input[i];
      this.frame[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(x * 32767)));
      if (this.filled === this.frameLength) {
        // Transferred, not copied: the buffer (and this.frame) is the page's from now on.
        this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
        this.frame = new Int16Array(this.frameLength);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("voicebus-capture", CaptureProcessor);
