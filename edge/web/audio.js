// The page's sound: the microphone (capture-worklet.js) and the speaker with its
// jitter buffer (player-worklet.js), each in its own AudioContext: capture at the
// device's rate, playback at the gateway's out_rate so played counts are exact.

const MAX_RATE = 48000; // the gateway accepts 8-48 kHz; above, let the browser resample

export class MicrophoneError extends Error {}

// What to tell the user when the microphone cannot be opened.
function explain(error) {
  if (error.name === "NotAllowedError" || error.name === "SecurityError") {
    return "Microphone permission denied: allow the microphone for this site " +
      "(the icon in the address bar), then press Start again.";
  }
  if (error.name === "NotFoundError" || error.name === "OverconstrainedError") {
    return "No microphone found: connect one, then press Start again.";
  }
  if (error.name === "NotReadableError") {
    return "The microphone is busy or failed (another program may hold it).";
  }
  return `The microphone could not be opened: ${error.message || error.name}`;
}

export class Microphone {
  // Must be called from a user gesture (a click): browsers start audio only then.
  constructor() {
    this.context = new AudioContext({ latencyHint: "interactive" });
    if (this.context.sampleRate > MAX_RATE) {
      this.context.close();
      this.context = new AudioContext({ latencyHint: "interactive", sampleRate: MAX_RATE });
    }
    this.onFrame = () => {};
    this.stream = null;
    this.node = null;
  }

  get rate() {
    return this.context.sampleRate;
  }

  async open() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new MicrophoneError(
        "This page can use the microphone only over https (or on localhost): " +
        "serve the gateway behind a TLS reverse proxy and open the https address.");
    }
    try {
      // The browser's echo canceller keeps the agent's voice out of the microphone, so
      // the agent does not barge in on itself; the other two steady the level.
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: 1, echoCancellation: true, noiseSuppression: true,
          autoGainControl: true,
        },
      });
    } catch (error) {
      throw new MicrophoneError(explain(error));
    }
    await this.context.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(this.context, "voicebus-capture", {
      numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
    });
    this.node.port.onmessage = (event) => this.onFrame(event.data);
    this.context.createMediaStreamSource(this.stream).connect(this.node);
    await this.context.resume();
  }

  setMuted(muted) {
    this.node?.port.postMessage({ type: "mute", muted });
  }

  close() {
    this.stream?.getTracks().forEach((track) => track.stop());
    this.context.close();
  }
}

export class Speaker {
  constructor(rate) {
    this.context = new AudioContext({ latencyHint: "interactive", sampleRate: rate });
    this.node = null;
    this.pendingFlushes = new Map(); // turn -> resolve(played)
    this.onProgress = () => {}; // ({turn: played}, buffered)
  }

  get rate() {
    return this.context.sampleRate;
  }

  async open() {
    await this.context.audioWorklet.addModule(new URL("player-worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(this.context, "voicebus-player", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
    });
    this.node.port.onmessage = (event) => this.onMessage(event.data);
    this.node.connect(this.context.destination);
    await this.context.resume();
  }

  onMessage(message) {
    if (message.type === "progress") {
      this.onProgress(message.played, message.buffered);
    } else if (message.type === "flushed") {
      this.pendingFlushes.get(message.turn)?.(message.played);
      this.pendingFlushes.delete(message.turn);
    }
  }

  play(turn, samples) {
    this.node.port.postMessage({ type: "audio", turn, samples }, [samples.buffer]);
  }

  end(turn) {
    this.node.port.postMessage({ type: "end", turn });
  }

  // Drop what is queued of the turn; resolves to how many of its samples were played.
  flush(turn) {
    return new Promise((resolve) => {
      this.pendingFlushes.set(turn, resolve);
      this.node.port.postMessage({ type: "flush", turn });
    });
  }

  flushAll() {
    this.node?.port.postMessage({ type: "flush-all" });
  }

  close() {
    this.context.close();
  }
}
