// The arena page: one prompt, two models drawn by the server, answers streamed side by side without
// names (the server sends "left" / "right" as the model); a vote, and only then the names.
"use strict";

const $ = (id) => document.getElementById(id);
const inputEl = $("input");
const statusEl = $("status");
const headers = vf.setupKey($("api-key"));
const SIDES = ["left", "right"];
const LABELS = { left: "Model A", right: "Model B" };

let battle = null;        // the battle id of this round
let controller = null;    // aborts both streams
let answered = false;     // both sides have finished (or been stopped): votes open
let round = 0;            // counts New rounds: a battle's or vote's late ending must not reach a later round

function sideText(side) {
  return document.querySelector(`#side-${side} .text`);
}

function setBusy(busy) {
  $("send").disabled = busy || battle !== null;
  $("stop").hidden = !busy;
  inputEl.disabled = busy || battle !== null; // one prompt a round: New round asks the next
}

function reset() {
  round++;
  if (controller) controller.abort();
  controller = null;
  battle = null;
  answered = false;
  setBusy(false);
  for (const side of SIDES) {
    $(`name-${side}`).textContent = LABELS[side];
    $(`name-${side}`).classList.remove("revealed");
    vf.renderNow(sideText(side), "");
    sideText(side).parentElement.classList.remove("error");
  }
  $("votes").hidden = true;
  for (const button of $("votes").querySelectorAll("button")) button.disabled = false;
  statusEl.textContent = "";
  inputEl.disabled = false;
  $("send").disabled = false;
  inputEl.focus();
}

async function fight(prompt) {
  const mine = ++round;
  const current = () => mine === round;
  controller = new AbortController();
  setBusy(true);
  statusEl.textContent = "both models are answering… (Esc or Stop to stop)";
  try {
    const response = await fetch("/arena/battles", { method: "POST", headers: headers(), body: "{}", signal: controller.signal });
    if (!response.ok) throw await vf.apiError(response);
    const id = (await response.json()).id;
    if (!current()) return;
    battle = id;
  } catch (err) {
    if (!current()) return;
    controller = null;
    setBusy(false);
    statusEl.textContent = err.name === "AbortError" ? "stopped" : err.message;
    if (err.status === 401) { $("key-label").hidden = false; $("api-key").focus(); }
    return;
  }
  const body = { messages: [{ role: "user", content: prompt }] };
  const results = await Promise.allSettled(SIDES.map(async (side) => {
    const textEl = sideText(side);
    textEl.parentElement.dataset.streaming = "true";
    let partial = "";
    try {
      const text = await vf.streamChat(`/arena/battles/${battle}/chat/${side}`, body, headers(), controller.signal, (t) => {
        partial = t;
        if (current()) vf.renderInto(textEl, t);
      });
      if (current()) vf.renderNow(textEl, text);
    } catch (err) {
      if (current()) vf.renderNow(textEl, partial); // now, so a pending redraw cannot wipe the error added below
      throw err;
    } finally {
      if (current()) textEl.parentElement.dataset.streaming = "false";
    }
  }));
  if (!current()) return; // New round came first: it has reset the page
  const stopped = controller.signal.aborted;
  controller = null;
  const failed = results.map((r, i) => [r, SIDES[i]]).filter(([r]) => r.status === "rejected" && r.reason.name !== "AbortError");
  for (const [r, side] of failed) {
    sideText(side).parentElement.classList.add("error");
    sideText(side).append(vf.el("p", { role: "alert", text: r.reason.message }));
  }
  answered = failed.length === 0 && !stopped; // the server takes a vote on whole answers only
  setBusy(false);
  $("votes").hidden = !answered;
  statusEl.textContent = failed.length ? "an answer failed: start a new round"
    : stopped ? "stopped: a battle is voted on whole answers only. New round starts another."
    : "Which answer is better? Vote to see the models' names.";
  if (answered) $("votes").querySelector("button").focus();
}

async function vote(choice) {
  const mine = round;
  for (const button of $("votes").querySelectorAll("button")) button.disabled = true;
  try {
    const response = await fetch(`/arena/battles/${battle}/vote`, { method: "POST", headers: headers(), body: JSON.stringify({ vote: choice }) });
    if (!response.ok) throw await vf.apiError(response);
    const result = await response.json();
    if (mine !== round) return; // New round came first: these names are the old battle's
    for (const side of SIDES) {
      $(`name-${side}`).textContent = `${LABELS[side]}: ${result.models[side]}`;
      $(`name-${side}`).classList.add("revealed");
    }
    statusEl.textContent = "Thanks for voting. New round starts another battle.";
    $("new-round").focus();
  } catch (err) {
    if (mine !== round) return;
    statusEl.textContent = err.message;
    for (const button of $("votes").querySelectorAll("button")) button.disabled = false;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = inputEl.value.trim();
  if (!prompt || controller || battle) return;
  fight(prompt);
});
vf.bindComposer($("composer"), inputEl, $("stop"), () => controller);
$("new-round").addEventListener("click", () => { inputEl.value = ""; reset(); });
for (const button of $("votes").querySelectorAll("button")) button.addEventListener("click", () => vote(button.dataset.vote));

fetch("/health").then((r) => r.json()).then((info) => {
  $("key-label").hidden = !info.auth;
  if (info.models.length < 2) statusEl.textContent = `The arena needs two models; this server serves ${info.models.length}.`;
}).catch((err) => { statusEl.textContent = `The server is unreachable: ${err.message}`; });
