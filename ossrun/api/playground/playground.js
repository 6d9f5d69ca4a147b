// The ossrun playground: a chat against this server's own OpenAI or Workers AI routes.
// Plain browser JavaScript, no build step. State: one conversation at a time, in OpenAI message form;
// a reply writes only into the conversation it was asked in, so "New chat" can never inherit one.
"use strict";

const MODEL = "@cf/openai/gpt-oss-20b";
const WEATHER_TOOL = {type: "function", function: {name: "get_weather", description: "Get the current weather in a city",
  parameters: {type: "object", properties: {city: {type: "string"}}, required: ["city"]}}};
const $ = (id) => document.getElementById(id);

// A conversation: the messages sent back to the server, the bubble each one is shown in, the open
// "Send result" forms, and the request in flight (its AbortController and its Reply).
function newChat() {
  return {messages: [], bubbles: new Map(), forms: [], failed: [], request: null};
}
const state = {chat: newChat()};

// The settings, or {error} when one cannot be sent as it is (the server would refuse it anyway).
function settings() {
  const max = $("max-tokens");
  if (!max.checkValidity() || !Number.isInteger(Number(max.value)) || Number(max.value) < 1) {
    return {error: "Max tokens must be a whole number of at least 1."};
  }
  return {route: $("route").value, temperature: Number($("temperature").value), maxTokens: Number(max.value),
          effort: $("effort").value, stream: $("stream").checked, tools: $("tools").checked, token: $("token").value.trim()};
}

// Settings good enough to send, else null with the reason shown on the page.
function checkedSettings() {
  const s = settings();
  if (!s.error) return s;
  showError(s.error);
  $("max-tokens").focus();
  return null;
}

function endpoint(route) {
  return route === "openai" ? "/v1/chat/completions" : `/client/v4/accounts/local/ai/run/${MODEL}`;
}

function requestBody(messages, s) {
  const body = {messages, temperature: s.temperature, max_tokens: s.maxTokens, reasoning_effort: s.effort};
  if (s.route === "openai") body.model = MODEL;
  if (s.stream) body.stream = true;
  if (s.stream && s.route === "openai") body.stream_options = {include_usage: true};
  if (s.tools) body.tools = [WEATHER_TOOL];
  return body;
}

function showCurl(url, body, s) {
  const note = s.token ? "# First set the token the server was started with (ossrun serve --api-token): export OSSRUN_API_TOKEN=...\n" : "";
  const auth = s.token ? ` \\\n  -H "Authorization: Bearer $OSSRUN_API_TOKEN"` : "";
  const json = JSON.stringify(body).replaceAll("'", "'\\''");
  $("curl").textContent = `${note}curl${s.stream ? " -N" : ""} ${location.origin}${url}${auth} \\\n` +
    `  -H 'Content-Type: application/json' \\\n  -d '${json}'`;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function errorText(payload, status) {
  if (payload && payload.error) return `${status ?? ""} ${payload.error.message || JSON.stringify(payload.error)}`.trim();
  if (payload && payload.errors && payload.errors.length) return `${status} ${payload.errors.map((e) => `${e.code}: ${e.message}`).join("; ")}`;
  return `${status} ${JSON.stringify(payload)}`;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// -- rendering --------------------------------------------------------------------------------------

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (text !== undefined) div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

// A line under a bubble saying what became of it (stopped, cut off, failed, superseded).
function note(div, text, kind) {
  let line = div.querySelector(":scope > .note");
  if (!line) {
    line = document.createElement("div");
    div.appendChild(line);
  }
  line.className = `note ${kind || ""}`.trim();
  line.textContent = text;
}

function assistantView() {
  const div = bubble("assistant");
  const details = document.createElement("details");
  details.className = "reasoning";
  details.open = true;
  details.hidden = true;
  details.innerHTML = "<summary>Reasoning</summary><div class=\"text\"></div>";
  const answer = document.createElement("div");
  answer.className = "answer";
  const calls = document.createElement("div");
  const usage = document.createElement("div");
  usage.className = "usage";
  div.append(details, answer, calls, usage);
  return {div, details, reasoning: details.querySelector(".text"), answer, calls, usage};
}

function renderToolCall(view, call) {
  let box = view.calls.querySelector(`[data-index="${call.index}"]`);
  if (!box) {
    box = document.createElement("div");
    box.className = "tool-call";
    box.dataset.index = call.index;
    box.innerHTML = "<div>Tool call: <span class=\"name\"></span></div><pre class=\"args\"></pre>";
    view.calls.appendChild(box);
  }
  box.querySelector(".name").textContent = call.function.name;
  let args = call.function.arguments;
  try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* still streaming */ }
  box.querySelector(".args").textContent = args;
}

// The form that answers a tool call. It works once, and only while its turn is the latest one.
function offerToolResult(chat, view, call) {
  const box = view.calls.querySelector(`[data-index="${call.index}"]`);
  const form = document.createElement("form");
  let city = "Paris";
  try { city = JSON.parse(call.function.arguments).city || city; } catch (e) { /* keep the default */ }
  form.innerHTML = "<input aria-label=\"tool result\"><button type=\"submit\">Send result</button>";
  form.querySelector("input").value = JSON.stringify({city, temperature_c: 21, condition: "cloudy"});
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (form.querySelector("button").disabled || chat !== state.chat || chat.request) return;
    const s = checkedSettings();
    if (!s) return;
    const content = form.querySelector("input").value;
    retireToolForms(chat, "Answered.");
    const message = {role: "tool", tool_call_id: call.id, content};
    chat.messages.push(message);
    chat.bubbles.set(message, bubble("tool", `${call.function.name} → ${content}`));
    send(chat, s);
  });
  box.appendChild(form);
  chat.forms.push(form);
}

// The user went on without answering the latest turn's tool call: the call leaves the history (it stays on screen,
// as a stopped stream's does), since a call needs its result before the next message (the server refuses the
// conversation otherwise, as OpenAI does). The reasoning that led to it goes too (left alone, "I will call
// get_weather" had the demo model call it again for a "Hello"), and a turn that was only those leaves it whole.
function dropUnansweredCalls(chat) {
  const last = chat.messages[chat.messages.length - 1];
  if (!chat.forms.length || !last || last.role !== "assistant" || !last.tool_calls) return;
  delete last.tool_calls;
  delete last.reasoning_content;
  if (!last.content) {
    chat.messages.pop();
    chat.bubbles.delete(last);
  }
}

// The conversation has moved on: older tool calls can no longer be answered.
function retireToolForms(chat, why) {
  for (const form of chat.forms) {
    for (const control of form.querySelectorAll("input, button")) control.disabled = true;
    note(form.parentElement, why, "muted");
  }
  chat.forms = [];
}

function renderUsage(view, usage) {
  if (!usage) return;
  const cost = usage.cost_usd !== undefined ? ` · $${Number(usage.cost_usd).toFixed(8)}` : "";
  const neurons = usage.neurons !== undefined ? ` · ${usage.neurons} neurons` : "";
  view.usage.textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens${cost}${neurons}`;
}

// -- one exchange -----------------------------------------------------------------------------------

class Reply {
  constructor(view) {
    this.view = view; this.reasoning = ""; this.content = ""; this.calls = []; this.usage = null; this.finishReason = null;
  }

  get empty() { return !this.reasoning && !this.content && !this.calls.length; }

  delta(d) {
    if (d.reasoning_content) {
      this.reasoning += d.reasoning_content;
      this.view.details.hidden = false;
      this.view.reasoning.textContent = this.reasoning;
    }
    if (d.content) {
      this.content += d.content;
      this.view.answer.textContent = this.content;
      this.view.details.open = false; // the answer has started: fold the reasoning away
    }
    for (const tc of d.tool_calls || []) {
      const call = this.calls[tc.index] || (this.calls[tc.index] = {index: tc.index, id: tc.id, type: "function", function: {name: "", arguments: ""}});
      if (tc.id) call.id = tc.id;
      if (tc.function && tc.function.name) call.function.name = tc.function.name;
      if (tc.function && tc.function.arguments) call.function.arguments += tc.function.arguments;
      renderToolCall(this.view, call);
    }
    this.view.div.scrollIntoView({block: "end"});
  }

  choice(c) {
    if (c.finish_reason) this.finishReason = c.finish_reason;
  }

  message(m) {
    this.delta({reasoning_content: m.reasoning_content, content: m.content,
                tool_calls: (m.tool_calls || []).map((tc, index) => ({index, ...tc}))});
  }

  // The assistant message as the server takes it back: the reasoning too, since harmony keeps the
  // reasoning that led to a tool call for the next turn (the server drops what it does not need).
  // Null when nothing arrived: an empty assistant turn is not a turn.
  asMessage(withCalls) {
    const calls = withCalls ? this.calls.filter(Boolean) : [];
    if (!this.reasoning && !this.content && !calls.length) return null;
    const message = {role: "assistant", content: this.content || null};
    if (this.reasoning) message.reasoning_content = this.reasoning;
    if (calls.length) message.tool_calls = calls.map(({index, ...call}) => call);
    return message;
  }

  // The reply ended (complete, cut at max tokens, or stopped by the user): what arrived joins the history.
  finish(chat, {stopped = false, maxTokens} = {}) {
    this.view.details.open = false;
    renderUsage(this.view, this.usage);
    // A stopped stream's tool call may be half written: it is shown, but neither kept nor answered.
    const message = this.asMessage(!stopped);
    if (message) {
      chat.messages.push(message);
      chat.bubbles.set(message, this.view.div);
    }
    if (stopped) {
      const kept = this.calls.length ? "the text shown is kept in the conversation, the unfinished tool call is not"
                                     : "the part shown is kept in the conversation";
      note(this.view.div, message ? `Stopped: ${kept}.` : "Stopped before any answer.", "warn");
      for (const box of this.view.calls.children) box.classList.add("cut");
    } else if (this.finishReason === "length") {
      note(this.view.div, this.content
        ? `Cut off at max tokens (${maxTokens}): the answer is incomplete.`
        : `Stopped at max tokens (${maxTokens}) before any answer: raise Max tokens or lower the reasoning effort.`, "warn");
    }
    if (!message) { // nothing to keep: the turn stays unanswered, and the next message replaces it
      this.view.div.classList.add("failed");
      chat.failed.push(this.view.div);
      markFailed(chat, "Not answered. The next message you send replaces this one.");
    }
    if (!stopped) for (const call of this.calls.filter(Boolean)) offerToolResult(chat, this.view, call);
  }

  // The request failed: a partial answer stays on screen, marked, and out of the conversation.
  fail(chat) {
    this.view.details.open = false;
    if (this.empty) { this.view.div.remove(); return; }
    this.view.div.classList.add("failed");
    note(this.view.div, "Cut off by the error above: not kept in the conversation.", "warn");
    chat.failed.push(this.view.div);
  }
}

// The turns no reply answered (a user message, or a tool result) are marked as such.
function markFailed(chat, text) {
  for (let i = chat.messages.length - 1; i >= 0 && chat.messages[i].role !== "assistant"; i--) {
    const div = chat.bubbles.get(chat.messages[i]);
    if (!div) continue;
    div.classList.add("failed");
    note(div, chat.messages[i].role === "user" ? text : "Not answered.", "warn");
    chat.failed.push(div);
  }
}

function clearFailed(chat) {
  for (const div of chat.failed) {
    div.classList.remove("failed");
    const line = div.querySelector(":scope > .note.warn");
    if (line) line.remove();
  }
  chat.failed = [];
}

async function readStream(response, reply) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line === "data: [DONE]") return;
        if (!line.startsWith("data: ")) continue;
        const frame = JSON.parse(line.slice(6));
        if (frame.error) throw new Error(errorText(frame));
        if (frame.usage) reply.usage = frame.usage;
        if (frame.choices && frame.choices.length) {
          reply.delta(frame.choices[0].delta || {});
          reply.choice(frame.choices[0]);
        }
      }
    }
  }
  throw new Error("The connection closed before the answer ended.");
}

// Ask for the next assistant turn of `chat`. Everything it writes goes to that conversation only.
async function send(chat, s) {
  if (chat.request) return;
  const url = endpoint(s.route);
  const body = requestBody(chat.messages, s);
  showCurl(url, body, s);
  showError("");
  clearFailed(chat);
  const view = assistantView();
  const request = {controller: new AbortController(), reply: new Reply(view), stopped: false};
  chat.request = request;
  setBusy(true);
  const reply = request.reply;
  try {
    const headers = {"Content-Type": "application/json"};
    if (s.token) headers.Authorization = `Bearer ${s.token}`;
    const response = await fetch(url, {method: "POST", headers, body: JSON.stringify(body), signal: request.controller.signal});
    if (!response.ok) {
      const payload = await response.json().catch(() => null);
      if (response.status === 401 || response.status === 403) $("token-dialog").hidden = false;
      throw new Error(errorText(payload, response.status));
    }
    if (s.stream) {
      await readStream(response, reply);
    } else {
      const payload = await response.json();
      const result = payload.result || payload;
      reply.usage = result.usage;
      reply.message(result.choices[0].message);
      reply.choice(result.choices[0]);
    }
    reply.finish(chat, {maxTokens: s.maxTokens});
  } catch (error) {
    if (chat !== state.chat) return; // "New chat" abandoned it: nothing of it is shown or kept
    if (request.stopped) {
      reply.finish(chat, {stopped: true});
    } else {
      reply.fail(chat);
      markFailed(chat, "Not answered (see the error). The next message you send replaces this one.");
      showError(String(error.message || error));
    }
  } finally {
    chat.request = null;
    if (chat === state.chat) setBusy(false);
  }
}

function stop() {
  const request = state.chat.request;
  if (!request) return;
  request.stopped = true;
  request.controller.abort();
}

// -- wiring -----------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const chat = state.chat;
  const text = $("prompt").value.trim();
  if (!text || chat.request) return;
  const s = checkedSettings();
  if (!s) return;
  // A user turn that got no answer is replaced by this one, on screen as in the history.
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "user") {
    const failed = chat.messages.pop();
    chat.bubbles.get(failed)?.remove();
    chat.bubbles.delete(failed);
  }
  for (const div of chat.failed) if (div.classList.contains("assistant")) div.remove();
  dropUnansweredCalls(chat);
  retireToolForms(chat, "Not answered: the conversation went on (the call is not kept in it).");
  const message = {role: "user", content: text};
  chat.messages.push(message);
  chat.bubbles.set(message, bubble("user", text));
  $("prompt").value = "";
  send(chat, s);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.isComposing || event.keyCode === 229) return; // Enter that confirms an IME conversion
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", stop);
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("clear").addEventListener("click", () => {
  const old = state.chat;
  state.chat = newChat();
  if (old.request) old.request.controller.abort(); // the server stops generating once the connection closes
  $("log").innerHTML = "";
  showError("");
  setBusy(false);
});
$("token").value = localStorage.getItem("ossrun-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("ossrun-token", $("token").value.trim()));
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  $("token").value = $("token-input").value.trim();
  localStorage.setItem("ossrun-token", $("token").value);
  $("token-dialog").hidden = true;
  const chat = state.chat;
  const last = chat.messages[chat.messages.length - 1];
  if (last && last.role !== "assistant" && !chat.request) {
    const s = checkedSettings();
    if (s) send(chat, s);
  }
});
$("model").textContent = MODEL;
