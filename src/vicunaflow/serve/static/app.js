// The vicunaflow chat page: streams each reply from /v1/chat/completions (server-sent events), renders
// it as markdown (common.js: DOM nodes only, model text never parsed as HTML), keeps the conversation and
// the settings in localStorage across reloads. Stop aborts the fetch: the server cancels the engine request.
"use strict";

const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const inputEl = $("input");
const statusEl = $("status");
const modelSelect = $("model-select");
const headers = vf.setupKey($("api-key"));

const STORE = { conversation: "vicunaflow-conversation", settings: "vicunaflow-settings", model: "vicunaflow-model" };
const DEFAULTS = { temperature: 0.7, top_p: 1, max_tokens: 512, system: "" };
const SETTINGS = { temperature: $("temperature"), top_p: $("top-p"), max_tokens: $("max-tokens"), system: $("system-prompt") };

let info = null;           // /health: models, contexts, whether keys are needed
let messages = load(STORE.conversation, []);   // [{role: "user" | "assistant", content, stopped?}]
let controller = null;     // aborts the reply being streamed

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE.conversation, JSON.stringify(messages));
}

// -- settings -----------------------------------------------------------------------------------------

function readSettings() {
  const number = (input, low, high, fallback) => {
    const value = Number(input.value);
    return input.value.trim() === "" || !Number.isFinite(value) ? fallback : Math.min(high, Math.max(low, value));
  };
  return {
    temperature: number(SETTINGS.temperature, 0, 2, DEFAULTS.temperature),
    top_p: number(SETTINGS.top_p, 0.01, 1, DEFAULTS.top_p),
    max_tokens: Math.round(number(SETTINGS.max_tokens, 1, 1e6, DEFAULTS.max_tokens)),
    system: SETTINGS.system.value.trim(),
  };
}

function showSettings(values) {
  for (const [name, input] of Object.entries(SETTINGS)) input.value = values[name];
}

showSettings({ ...DEFAULTS, ...load(STORE.settings, {}) });
for (const input of Object.values(SETTINGS)) {
  input.addEventListener("change", () => localStorage.setItem(STORE.settings, JSON.stringify(readSettings())));
}
$("reset-settings").addEventListener("click", () => {
  showSettings(DEFAULTS);
  localStorage.removeItem(STORE.settings);
});
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) SETTINGS.temperature.focus();
});

// -- server info --------------------------------------------------------------------------------------

async function loadInfo() {
  try {
    info = await (await fetch("/health")).json();
  } catch (err) {
    statusEl.textContent = `The server is unreachable: ${err.message}`;
    return;
  }
  const stored = localStorage.getItem(STORE.model);
  modelSelect.replaceChildren(...info.models.map((name) => vf.el("option", { value: name, text: name })));
  modelSelect.value = info.models.includes(stored) ? stored : info.model;
  modelSelect.hidden = info.models.length < 2;
  $("arena-link").hidden = info.models.length < 2;
  $("key-label").hidden = !info.auth;
  showModel();
}

function showModel() {
  const stats = info.engines ? info.engines[modelSelect.value] : info.engine;
  $("model").textContent = `${modelSelect.value} · context ${stats.context} tokens`;
}

modelSelect.addEventListener("change", () => {
  localStorage.setItem(STORE.model, modelSelect.value);
  showModel();
});

// -- the conversation ---------------------------------------------------------------------------------

function messageEl(message) {
  const role = message.role;
  const text = vf.el("div", { class: "text" });
  if (role === "assistant") vf.renderNow(text, message.content);
  else text.textContent = message.content;
  const label = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
  const node = vf.el("article", { class: `message ${role}`, "aria-label": `${label} said` }, vf.el("span", { class: "role", text: label }), text);
  if (role === "assistant") node.dataset.streaming = "false";
  if (message.stopped) node.append(vf.el("span", { class: "note", text: "(stopped)" }));
  if (role !== "error") {
    node.append(vf.el("div", { class: "actions" }, vf.copyButton(() => message.content, `Copy this ${label === "You" ? "question" : "answer"}`)));
  } else {
    node.setAttribute("role", "alert");
  }
  return node;
}

function render() {
  messagesEl.replaceChildren(...messages.map(messageEl));
  updateButtons();
  messagesEl.scrollTop = messagesEl.scrollHeight;
}

// Whether the conversation is scrolled to (about) its end: only then does a streaming reply pull it along,
// so a reader who scrolled up to the start of a long reply stays there.
function atBottom() {
  return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 40;
}
let following = true; // the reader's choice, as of their last scroll (a reply growing below does not change it)
messagesEl.addEventListener("scroll", () => { following = atBottom(); });

function updateButtons() {
  const busy = controller !== null;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("regenerate").disabled = busy || !messages.length;
}

function showError(err) {
  messagesEl.append(messageEl({ role: "error", content: err.message }));
  messagesEl.scrollTop = messagesEl.scrollHeight;
  if (err.status === 401) {
    $("key-label").hidden = false;
    $("api-key").focus(); // the fix is there
  } else {
    inputEl.focus();
  }
}

async function generate() {
  if (!info) await loadInfo();
  if (!info) return;
  const settings = readSettings();
  const body = {
    model: modelSelect.value,
    messages: [
      ...(settings.system ? [{ role: "system", content: settings.system }] : []),
      ...messages.map(({ role, content }) => ({ role, content })),
    ],
    temperature: settings.temperature,
    top_p: settings.top_p,
    max_tokens: settings.max_tokens,
  };
  const conversation = messages; // New chat replaces it: a reply still arriving then belongs to no one
  const node = messageEl({ role: "assistant", content: "" });
  const textEl = node.querySelector(".text");
  node.dataset.streaming = "true";
  messagesEl.append(node);
  controller = new AbortController();
  updateButtons();
  statusEl.textContent = "answering… (Esc or Stop to stop)";
  let reply = "";
  let scrollQueued = false;
  try {
    reply = await vf.streamChat("/v1/chat/completions", body, headers(), controller.signal, (text) => {
      reply = text;
      vf.renderInto(textEl, text); // draws at the next frame
      if (!scrollQueued) {
        scrollQueued = true;
        requestAnimationFrame(() => { // after renderInto's, registered first: the new text is drawn
          scrollQueued = false;
          if (following) messagesEl.scrollTop = messagesEl.scrollHeight;
        });
      }
    });
    if (messages !== conversation) return;
    messages.push({ role: "assistant", content: reply.trim() });
    statusEl.textContent = "";
  } catch (err) {
    if (messages !== conversation) return; // New chat aborted it: nothing to keep or report
    if (err.name === "AbortError") {
      if (reply) messages.push({ role: "assistant", content: reply.trim(), stopped: true });
      statusEl.textContent = "stopped";
    } else {
      node.remove();
      controller = null;
      save();
      render();
      statusEl.textContent = "";
      showError(err);
      return;
    }
  } finally {
    controller = null;
    if (messages !== conversation) updateButtons();
  }
  save();
  const top = messagesEl.scrollTop;
  const keep = !following;
  render();
  if (keep) messagesEl.scrollTop = top; // a reader scrolled up in the reply stays there
  inputEl.focus({ preventScroll: true });
}

function send(question) {
  // an unanswered question left by an error or a stop is replaced, not sent twice in a row
  if (messages.length && messages[messages.length - 1].role === "user") messages.pop();
  messages.push({ role: "user", content: question });
  save();
  render();
  generate();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = inputEl.value.trim();
  if (!question || controller) return;
  inputEl.value = "";
  send(question);
});

vf.bindComposer($("composer"), inputEl, $("stop"), () => controller);

$("regenerate").addEventListener("click", () => {
  if (controller) return;
  while (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  if (!messages.length) return;
  save();
  render();
  generate();
});

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  save();
  render();
  statusEl.textContent = "new conversation";
  inputEl.focus();
});

render();
loadInfo();
