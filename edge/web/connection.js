// The WebSocket session with the gateway (edge/protocol.py): `start` with the
// microphone's rate, `ready`, then audio both ways. When the gateway goes away the page
// connects again with a growing delay; when it refuses the token it says why and stops.

const BACKOFF_S = [0.5, 1, 2, 4, 8, 15];
const MAX_BUFFERED_BYTES = 256 * 1024; // a stalled network: drop mic frames, not queue them
// Closes after which trying again cannot help: the page or the device is at fault.
const FINAL_CLOSES = new Set([1008, 1009, 4008]);
const CLOSE_MEANINGS = {
  1000: "closed", 1001: "the gateway is going away", 1006: "connection lost",
  1008: "bad message", 1009: "frame too large", 1011: "server error",
  4002: "session too long", 4003: "idle too long", 4008: "too many frames per second",
};

export class Connection {
  // handlers: onReady(msg), onControl(msg), onAudio(ArrayBuffer), onClosed(),
  //           onState(state, detail), checkToken() -> {ok, reason}
  constructor(token, rate, handlers) {
    this.token = token;
    this.rate = rate;
    this.on = handlers;
    this.ws = null;
    this.ready = false;
    this.stopped = true;
    this.attempt = 0;
    this.timer = null;
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this.open();
  }

  open() {
    this.on.onState("connecting", "");
    const url = new URL(`v1/session?token=${encodeURIComponent(this.token)}`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    let opened = false;
    let errorReason = "";
    ws.onopen = () => {
      opened = true;
      ws.send(JSON.stringify({ type: "start", sample_rate: this.rate }));
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") {
        this.on.onAudio(event.data);
        return;
      }
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        this.ready = true;
        this.attempt = 0;
        this.on.onState("connected", message.user_id);
        this.on.onReady(message);
      } else if (message.type === "error") {
        errorReason = String(message.reason || "");
      }
      this.on.onControl(message);
    };
    ws.onclose = (event) => this.closed(event, opened, errorReason);
    this.ws = ws;
  }

  async closed(event, opened, errorReason) {
    this.ws = null;
    this.ready = false;
    this.on.onClosed();
    if (this.stopped) {
      this.on.onState("idle", "");
      return;
    }
    if (!opened) { // the handshake failed: a refused token, or no gateway at all
      const check = await this.on.checkToken();
      if (check.ok === false) {
        this.stopped = true;
        this.on.onState("refused", check.reason);
        return;
      }
    }
    const why = event.reason || errorReason || CLOSE_MEANINGS[event.code] || `closed (${event.code})`;
    if (FINAL_CLOSES.has(event.code)) {
      this.stopped = true;
      this.on.onState("failed", why);
      return;
    }
    const delay = BACKOFF_S[Math.min(this.attempt++, BACKOFF_S.length - 1)];
    this.on.onState("reconnecting", `${why}; trying again in ${delay} s`);
    this.timer = setTimeout(() => this.open(), delay * 1000);
  }

  sendAudio(frame) {
    if (this.ready && this.ws.bufferedAmount < MAX_BUFFERED_BYTES) this.ws.send(frame);
  }

  send(message) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  // Hang up: `stop` ends the session at once on the gateway (no idle timeout to wait).
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) {
      this.send({ type: "stop" });
      this.ws.close(1000, "bye");
    } else {
      this.on.onState("idle", "");
    }
  }
}
