// Shared by the chat and arena pages: a safe markdown renderer, the SSE reader, API errors, copy buttons.
//
// The renderer never parses HTML: it builds DOM nodes and puts every piece of model text into them with
// textContent, so `<script>` or `<img onerror=...>` in a reply is shown as those characters, never run.
// It knows fenced code blocks (an unclosed fence while streaming runs to the end), headings, lists,
// block quotes, paragraphs, and inline `code`, **bold**, *italic* / _italic_ and [links](url) whose
// scheme is http, https or mailto (anything else, javascript: included, stays plain text).
"use strict";

const vf = (() => {
  const SAFE_SCHEMES = ["http:", "https:", "mailto:"];

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("aria-") || key.startsWith("data-") || key === "role" || key === "type") node.setAttribute(key, value);
      else node[key] = value;
    }
    node.append(...children);
    return node;
  }

  function safeHref(url) {
    try {
      const parsed = new URL(url, window.location.href);
      return SAFE_SCHEMES.includes(parsed.protocol) ? parsed.href : null;
    } catch {
      return null;
    }
  }

  // Inline spans: code first (its content is literal), then links, bold, italic; nested spans recurse.
  const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^()\s]+)\)|\*\*(?=\S)([\s\S]*?\S)\*\*|\*(?=\S)([^*]*?\S)\*|\b_(?=\S)([^_]*?\S)_\b/g;

  function inline(text) {
    const out = [];
    const pattern = new RegExp(INLINE.source, "g"); // its own lastIndex: nested spans recurse
    let last = 0;
    for (let m; (m = pattern.exec(text)); ) {
      if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
      last = pattern.lastIndex;
      if (m[1]) out.push(el("code", { text: m[2] }));
      else if (m[3] !== undefined) {
        const href = safeHref(m[4]);
        out.push(href ? el("a", { href, rel: "noopener noreferrer nofollow", target: "_blank" }, ...inline(m[3])) : document.createTextNode(m[0]));
      } else if (m[5] !== undefined) out.push(el("strong", {}, ...inline(m[5])));
      else out.push(el("em", {}, ...inline(m[6] !== undefined ? m[6] : m[7])));
    }
    if (last < text.length) out.push(document.createTextNode(text.slice(last)));
    return out;
  }

  function codeBlock(code, lang) {
    const codeEl = el("code", { text: code });
    if (lang) codeEl.className = `language-${lang.replace(/[^\w+-]/g, "")}`;
    const copy = copyButton(() => code, "Copy code");
    return el("div", { class: "code-block" }, el("div", { class: "code-head" }, el("span", { text: lang || "code" }), copy), el("pre", {}, codeEl));
  }

  function renderMarkdown(text) {
    const root = document.createDocumentFragment();
    const lines = text.split("\n");
    let paragraph = [];
    let list = null; // {el, ordered}
    const flush = () => {
      if (paragraph.length) {
        const p = el("p");
        paragraph.forEach((line, i) => {
          if (i) p.append(el("br"));
          p.append(...inline(line));
        });
        root.append(p);
        paragraph = [];
      }
    };
    const endList = () => { list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)\s*$/);
      if (fence) {
        flush(); endList();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        root.append(codeBlock(body.join("\n"), fence[2]));
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*([-*+])\s+(.*)$/);
      const numbered = line.match(/^\s*(\d{1,9})[.)]\s+(.*)$/);
      const quote = line.match(/^\s*>\s?(.*)$/);
      if (!line.trim()) { flush(); endList(); }
      else if (heading) { flush(); endList(); root.append(el(`h${Math.min(heading[1].length + 2, 6)}`, {}, ...inline(heading[2]))); }
      else if (bullet || numbered) {
        flush();
        const ordered = Boolean(numbered);
        if (!list || list.ordered !== ordered) {
          list = { el: el(ordered ? "ol" : "ul"), ordered };
          if (ordered && numbered[1] !== "1") list.el.start = Number(numbered[1]);
          root.append(list.el);
        }
        list.el.append(el("li", {}, ...inline((bullet || numbered)[2])));
      } else if (quote) { flush(); endList(); root.append(el("blockquote", {}, ...inline(quote[1]))); }
      else { endList(); paragraph.push(line); }
    }
    flush();
    return root;
  }

  function copyButton(getText, label) {
    const button = el("button", { type: "button", class: "copy", text: "Copy", "aria-label": label, title: label });
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(getText());
        button.textContent = "Copied";
      } catch {
        // no clipboard permission (plain http on another host): select the text so Ctrl+C works
        const range = document.createRange();
        range.selectNodeContents(button.closest(".message, .code-block") || button);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    return button;
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

  // An Error whose message says what to do, from a refused response's OpenAI-style body.
  async function apiError(response) {
    const body = await response.json().catch(() => ({}));
    const error = body.error || {};
    const server = error.message || `HTTP ${response.status}`;
    let message = server;
    if (response.status === 401) message = "The server refused the API key (401): enter a valid key in the API key field above.";
    else if (error.code === "context_length_exceeded") message = `The conversation is too long for this model: ${server} Start a new chat or shorten your message.`;
    else if (response.status === 404 && error.code === "model_not_found") message = `${server} Reload the page to see the models served now.`;
    else if (response.status === 413) message = `The message is too large for this server: ${server}`;
    else if (response.status >= 500) message = `The server failed (${response.status}): ${server}`;
    const err = new Error(message);
    err.status = response.status;
    err.code = error.code;
    return err;
  }

  const KEY_STORE = "vicunaflow-api-key";

  function setupKey(keyEl) {
    keyEl.value = localStorage.getItem(KEY_STORE) || "";
    keyEl.addEventListener("change", () => localStorage.setItem(KEY_STORE, keyEl.value.trim()));
    return () => {
      const headers = { "Content-Type": "application/json" };
      if (keyEl.value.trim()) headers.Authorization = `Bearer ${keyEl.value.trim()}`;
      return headers;
    };
  }

  // Streams one chat completion into onText(fullText); returns the whole text. Throws apiError / AbortError.
  async function streamChat(url, body, headers, signal, onText) {
    const response = await fetch(url, { method: "POST", headers, body: JSON.stringify({ ...body, stream: true }), signal });
    if (!response.ok) throw await apiError(response);
    let text = "";
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(`The server failed while answering: ${event.error.message}`);
      const delta = event.choices && event.choices.length ? event.choices[0].delta : {};
      if (delta.content) {
        text += delta.content;
        onText(text);
      }
    }
    return text;
  }

  // The composer's keys: Enter sends the form (Shift+Enter is a new line; not while an IME composes);
  // Escape and the stop button abort running(), the page's AbortController (null while idle).
  function bindComposer(form, input, stopButton, running) {
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    const stop = () => {
      const controller = running();
      if (controller) controller.abort();
    };
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") stop();
    });
    stopButton.addEventListener("click", stop);
  }

  // Re-render at most once a frame while a reply streams in.
  function renderInto(target, text) {
    target.dataset.chars = String(text.length);
    if (target._pending !== undefined) { target._pending = text; return; }
    target._pending = text;
    requestAnimationFrame(() => {
      const latest = target._pending;
      if (latest === undefined) return; // renderNow came first
      target._pending = undefined;
      target.replaceChildren(renderMarkdown(latest));
    });
  }

  function renderNow(target, text) {
    target._pending = undefined;
    target.dataset.chars = String(text.length);
    target.replaceChildren(renderMarkdown(text));
  }

  return { el, renderMarkdown, renderInto, renderNow, copyButton, sseEvents, apiError, setupKey, streamChat, bindComposer, safeHref };
})();
