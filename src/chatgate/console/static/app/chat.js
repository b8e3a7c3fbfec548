// Chat through chatgate's own `/v1/chat/completions`, streamed: the same path as every client.
import { api, errorOf } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const MAX_IMAGE_BYTES = 5 * 1024 * 1024;

export function chatView(main) {
  const history = []; // {role, content, images?}
  let attachments = []; // data: URLs
  let controller = null;

  const model = h("select", { id: "chat-model", name: "model", required: true });
  const system = h("textarea", { id: "chat-system", rows: 2, placeholder: "You are a helpful assistant." });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: "0.7" });
  const log = h("div", { className: "messages", "aria-live": "polite" });
  const status = h("div", { className: "status" });
  const prompt = h("textarea", {
    id: "chat-prompt", rows: 3, placeholder: "Message (Enter sends, Shift+Enter for a new line)",
    "aria-label": "Message",
  });
  const picker = h("input", { type: "file", accept: "image/*", multiple: true, id: "chat-image", className: "visually-hidden" });
  const thumbs = h("div", { className: "thumbs" });
  const send = h("button", { type: "submit", className: "send" }, "Send");
  const stop = h("button", { type: "button", className: "stop", hidden: true, onclick: () => controller?.abort() }, "Stop");
  const regenerate = h("button", { type: "button", className: "regenerate secondary", hidden: true, onclick: redo }, "Regenerate");

  main.append(
    h("section", { className: "chat" },
      h("div", { className: "chat-settings card" },
        h("label", { htmlFor: "chat-model" }, "Model"), model,
        h("details", {},
          h("summary", {}, "System prompt and temperature"),
          h("label", { htmlFor: "chat-system" }, "System prompt"), system,
          h("label", { htmlFor: "chat-temperature" }, "Temperature"), temperature,
        ),
      ),
      log,
      status,
      h("form", { className: "composer", onsubmit: submit },
        prompt,
        thumbs,
        h("div", { className: "actions" },
          h("label", { htmlFor: "chat-image", className: "button secondary" }, "Attach image"), picker,
          regenerate, stop, send,
        ),
      ),
    ),
  );

  api("GET", "/api/models").then(({ data }) => {
    if (!data.length) status.append(errorBox("No models yet: add one on the Models page."));
    for (const m of data) model.append(h("option", { value: m.id }, m.sharing === "private" ? m.name : `${m.name} (${m.sharing})`));
    model.dataset.loaded = "true";
  }, (error) => status.append(errorBox(error.message)));

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send.click();
    }
  });
  prompt.addEventListener("paste", (event) => {
    const files = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      attach(files);
    }
  });
  picker.addEventListener("change", () => {
    attach([...picker.files]);
    picker.value = "";
  });

  function attach(files) {
    for (const file of files) {
      if (file.size > MAX_IMAGE_BYTES) {
        status.append(errorBox(`${file.name} is larger than 5 MB`));
        continue;
      }
      const reader = new FileReader();
      reader.onload = () => {
        attachments.push(reader.result);
        showThumbs();
      };
      reader.readAsDataURL(file);
    }
  }

  function showThumbs() {
    clear(thumbs);
    attachments.forEach((url, index) => thumbs.append(
      h("button", {
        type: "button", className: "thumb", title: "Remove image",
        onclick: () => { attachments.splice(index, 1); showThumbs(); },
      }, h("img", { src: url, alt: `Attached image ${index + 1}` })),
    ));
  }

  function submit(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (controller || (!text && !attachments.length) || !model.value) return;
    history.push({ role: "user", content: text, images: attachments });
    log.append(messageElement("user", text, attachments));
    prompt.value = "";
    attachments = [];
    showThumbs();
    complete();
  }

  function redo() {
    if (controller) return;
    if (history.at(-1)?.role === "assistant") {
      history.pop();
      log.lastElementChild?.remove();
    }
    complete();
  }

  async function complete() {
    clear(status);
    const answer = messageElement("assistant", "");
    answer.dataset.state = "streaming";
    log.append(answer);
    const content = answer.querySelector(".content");
    controller = new AbortController();
    busy(true);
    let text = "";
    let drawn = false;
    const draw = () => {
      drawn = false;
      renderMarkdown(content, text);
      answer.scrollIntoView({ block: "end" });
    };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          model: model.value,
          messages: wire(),
          stream: true,
          temperature: Number(temperature.value),
        }),
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const event of events(response.body)) {
        if (event === "[DONE]") break;
        const chunk = JSON.parse(event);
        if (chunk.error) throw new Error(chunk.error.message ?? "The model server failed");
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          text += delta;
          if (!drawn) {
            drawn = true;
            requestAnimationFrame(draw);
          }
        }
      }
      answer.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") {
        answer.dataset.state = "stopped";
      } else {
        answer.dataset.state = "error";
        status.append(errorBox(error.message));
      }
    } finally {
      draw();
      controller = null;
      busy(false);
      if (text) history.push({ role: "assistant", content: text });
      else answer.remove();
    }
  }

  // Messages as the OpenAI API takes them; images as chatbot-ui sends them (image_url parts).
  function wire() {
    const messages = system.value.trim() ? [{ role: "system", content: system.value.trim() }] : [];
    for (const message of history) {
      if (message.images?.length) {
        messages.push({
          role: message.role,
          content: [
            { type: "text", text: message.content },
            ...message.images.map((url) => ({ type: "image_url", image_url: { url } })),
          ],
        });
      } else {
        messages.push({ role: message.role, content: message.content });
      }
    }
    return messages;
  }

  function busy(on) {
    stop.hidden = !on;
    send.disabled = on;
    regenerate.hidden = on || !history.length;
    if (on) stop.focus();
    else prompt.focus();
  }

  prompt.focus();
  return () => controller?.abort();
}

function messageElement(role, text, images = []) {
  const content = h("div", { className: "content" });
  if (role === "user") content.append(h("p", {}, text)); // the user's words: text, never HTML
  else renderMarkdown(content, text);
  return h("article", { className: `message ${role}` },
    h("h2", { className: "role" }, role === "user" ? "You" : "Model"),
    content,
    images.length ? h("div", { className: "thumbs" }, images.map((url) => h("img", { src: url, alt: "Attached image" }))) : null,
  );
}

// Server-sent events' data fields, as they arrive (LF, CRLF or CR line ends).
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A CR at the end may be half of a CRLF split across reads: keep it for the next one.
    const held = buffer.endsWith("\r") ? "\r" : "";
    const lines = (held ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
    buffer = lines.pop() + held;
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
  }
}
