// The page: buttons, captions and notices around the microphone, the speaker, the
// connection and the turns. `window.voicebus` shows the page's state to scripts (the
// tests read it): connection state, notice, samples played, the turns.

import { Microphone, MicrophoneError, Speaker } from "./audio.js";
import { Connection } from "./connection.js";
import { checkToken, storeToken, takeToken } from "./token.js";
import { Turns } from "./turns.js";

const DEFAULT_OUT_RATE = 24000; // until `ready` says otherwise (tts.sample_rate)
// turn_done's latency_ms keys, in pipeline order (as `voicebus talk` prints them).
const LATENCY_LABELS = {
  turn_detect: "turn detect", asr: "asr", llm_ttft: "llm ttft",
  llm_first_text: "llm first text", tts_first_chunk: "tts first chunk",
};
const STATE_TEXT = {
  idle: () => "not connected", connecting: () => "connecting…",
  connected: (user) => `connected as ${user}: speak`, reconnecting: (why) => `reconnecting: ${why}`,
  refused: (why) => `token refused: ${why}`, failed: () => "stopped",
};

const $ = (selector) => document.querySelector(selector);
const ui = {
  state: $("#state"), start: $("#start"), stop: $("#stop"), talk: $("#talk"),
  notice: $("#notice"), tokenForm: $("#token-form"), tokenInput: $("#token-input"),
  turns: $("#turns"),
};

let token = takeToken();
let microphone = null;
let speaker = null;
let connection = null;
let turns = null;
const turnViews = new Map(); // turn id -> its <li>

const page = { state: "idle", notice: "", userId: "" };
window.voicebus = {
  get state() { return page.state; },
  get notice() { return page.notice; },
  get userId() { return page.userId; },
  get playedSamples() { return turns ? turns.playedSamples : 0; },
  turns: () => (turns ? turns.summary() : []),
  reports: () => (turns ? [...turns.reports] : []),
};

function setState(state, detail) {
  page.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = STATE_TEXT[state](detail);
  if (state === "connected") page.userId = detail;
  if (state === "refused") {
    notify(`The gateway refused the token: ${detail}. Ask for a new link ` +
      "(voicebus token --user ID --url) or paste a new token below.");
    ui.tokenForm.hidden = false;
  }
  if (state === "failed") notify(detail);
  const live = !["idle", "refused", "failed"].includes(state);
  ui.start.hidden = live;
  ui.stop.hidden = !live;
  if (!live) hangUpAudio();
}

function notify(text) {
  page.notice = text;
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

// -- turns on screen ----------------------------------------------------------------

function latencyLine(turn) {
  const latency = { ...turn.latency };
  const head = latency.end_of_speech_to_first_audio;
  delete latency.end_of_speech_to_first_audio;
  let text = head === undefined ? "no audio" : `end of speech → first audio ${Math.round(head)} ms`;
  const parts = Object.keys(LATENCY_LABELS).filter((key) => key in latency)
    .map((key) => `${LATENCY_LABELS[key]} ${Math.round(latency[key])}`);
  if (parts.length) text += ` (${parts.join(", ")})`;
  return turn.interrupted ? `${text} · interrupted` : text;
}

function render(turn) {
  let view = turnViews.get(turn.id);
  if (turn.continued) { // the user went on: the turn that continues it shows the words
    view?.remove();
    return;
  }
  if (!view) {
    view = document.createElement("li");
    view.className = "turn";
    view.dataset.turn = turn.id;
    for (const part of ["user", "agent", "meta"]) {
      const p = document.createElement("p");
      p.className = part;
      view.append(p);
    }
    turnViews.set(turn.id, view);
    ui.turns.append(view);
  }
  view.querySelector(".user").textContent = turn.transcript;
  view.querySelector(".agent").textContent = turn.reply;
  view.querySelector(".meta").textContent = turn.done || turn.interrupted ? latencyLine(turn) : "";
  view.classList.toggle("interrupted", turn.interrupted);
  view.scrollIntoView({ block: "end" });
}

// -- starting and stopping ------------------------------------------------------------

async function start() {
  notify("");
  ui.start.disabled = true;
  try {
    // Both audio contexts are made here, in the click: browsers start audio only then.
    microphone = new Microphone();
    speaker ??= new Speaker(DEFAULT_OUT_RATE);
    const speakerOpened = speaker.node ? Promise.resolve() : speaker.open();
    await microphone.open();
    await speakerOpened;
  } catch (error) {
    ui.start.disabled = false;
    setState("failed", error instanceof MicrophoneError ? error.message
      : `Audio failed: ${error.message}`);
    return;
  }
  ui.start.disabled = false;
  turns = new Turns(speaker, (message) => connection?.send(message), render);
  speaker.onProgress = (played) => turns.onProgress(played);
  connection = new Connection(token, microphone.rate, {
    onReady, onState: setState,
    onControl: (message) => turns.onControl(message),
    onAudio: (buffer) => turns.onAudio(buffer),
    onClosed: () => turns.reset(),
    checkToken: () => checkToken(token),
  });
  microphone.onFrame = (frame) => connection.sendAudio(frame);
  applyMode();
  connection.start();
}

async function onReady(ready) {
  if (ready.out_rate === speaker.rate) return;
  // Another TTS rate than assumed: a new speaker at that rate (the page was already
  // clicked, so the browser lets it start). Audio can only follow the first reply.
  speaker.close();
  speaker = new Speaker(ready.out_rate);
  turns.speaker = speaker;
  speaker.onProgress = (played) => turns.onProgress(played);
  await speaker.open();
}

function hangUpAudio() {
  microphone?.close();
  microphone = null;
}

function stop() {
  connection?.stop();
}

// -- open mic or push to talk -------------------------------------------------------

function pushToTalk() {
  return document.querySelector('input[name="mode"]:checked').value === "push";
}

function applyMode() {
  ui.talk.hidden = !pushToTalk();
  microphone?.setMuted(pushToTalk());
}

function press(pressed) {
  if (!pushToTalk()) return;
  ui.talk.classList.toggle("pressed", pressed);
  microphone?.setMuted(!pressed);
}

// -- the token --------------------------------------------------------------------------

async function useToken(value) {
  token = value;
  ui.start.disabled = true;
  const check = await checkToken(token);
  if (check.ok === false) {
    setState("refused", check.reason);
    return;
  }
  ui.tokenForm.hidden = true;
  notify(check.ok ? "" : `Cannot reach the gateway (${check.reason}); Start will keep trying.`);
  if (check.ok) page.userId = check.userId;
  ui.start.disabled = false;
  ui.start.textContent = check.ok ? `Start talking as ${check.userId}` : "Start";
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
for (const input of document.querySelectorAll('input[name="mode"]')) {
  input.addEventListener("change", applyMode);
}
ui.talk.addEventListener("pointerdown", () => press(true));
for (const event of ["pointerup", "pointerleave", "pointercancel"]) {
  ui.talk.addEventListener(event, () => press(false));
}
document.addEventListener("keydown", (event) => {
  if (event.code === "Space" && !event.repeat && event.target === document.body) press(true);
});
document.addEventListener("keyup", (event) => {
  if (event.code === "Space") press(false);
});
ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const value = ui.tokenInput.value.trim();
  if (!value) return;
  storeToken(value);
  ui.tokenInput.value = "";
  useToken(value);
});

if (token) {
  useToken(token);
} else {
  ui.tokenForm.hidden = false;
  notify("This page needs a device token: open the link printed by " +
    "voicebus token --user ID --url, or paste a token below.");
}
