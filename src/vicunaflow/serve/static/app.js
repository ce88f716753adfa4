// The vicunaflow chat page: keeps the conversation in memory, streams each reply from
// /v1/chat/completions (server-sent events) and renders it as plain text as it arrives.
"use strict";

const messagesEl = document.getElementById("messages");
const inputEl = document.getElementById("input");
const sendEl = document.getElementById("send");
const stopEl = document.getElementById("stop");
const statusEl = document.getElementById("status");
const keyEl = document.getElementById("api-key");

let model = null;
let history = [];          // [{role, content}] sent with every request (multi-turn)
let controller = null;     // aborts the reply being streamed

keyEl.value = localStorage.getItem("vicunaflow-api-key") || "";
keyEl.addEventListener("change", () => localStorage.setItem("vicunaflow-api-key", keyEl.value.trim()));

async function loadInfo() {
  try {
    const info = await (await fetch("/health")).json();
    model = info.model;
    document.getElementById("model").textContent = `${info.model} · context ${info.engine.context} tokens`;
    document.getElementById("key-label").hidden = !info.auth;
  } catch (err) {
    statusEl.textContent = `server unreachable: ${err}`;
  }
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(label, body);
  messagesEl.append(el);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return body;
}

function setBusy(busy) {
  sendEl.disabled = busy;
  stopEl.hidden = !busy;
}

// Yields the JSON payload of each `data:` event of a server-sent event stream.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(question) {
  if (!model) await loadInfo();
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const textEl = addMessage("assistant", "");
  const messageEl = textEl.parentElement;
  messageEl.dataset.streaming = "true";
  setBusy(true);
  statusEl.textContent = "";
  controller = new AbortController();
  const headers = { "Content-Type": "application/json" };
  if (keyEl.value.trim()) headers.Authorization = `Bearer ${keyEl.value.trim()}`;
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify({ model, messages: history, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices.length ? event.choices[0].delta : {};
      if (delta.content) {
        reply += delta.content;
        textEl.textContent = reply;
        messagesEl.scrollTop = messagesEl.scrollHeight;
      }
    }
    history.push({ role: "assistant", content: reply.trim() });
  } catch (err) {
    history.pop(); // the question was not answered: do not send it again
    if (err.name === "AbortError") {
      statusEl.textContent = "stopped";
    } else {
      messageEl.classList.add("error");
      textEl.textContent = reply + (reply ? "\n" : "") + `[${err.message}]`;
    }
  } finally {
    messageEl.dataset.streaming = "false";
    controller = null;
    setBusy(false);
    inputEl.focus();
  }
}

document.getElementById("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = inputEl.value.trim();
  if (!question || controller) return;
  inputEl.value = "";
  send(question);
});

inputEl.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("composer").requestSubmit();
  }
});

stopEl.addEventListener("click", () => controller && controller.abort());

document.getElementById("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  messagesEl.replaceChildren();
  statusEl.textContent = "new conversation";
  inputEl.focus();
});

loadInfo();
