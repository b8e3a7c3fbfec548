// The console's shell: who is signed in, the sign-in form, and a view per `#/route`.
import { api } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import { adminView } from "./admin.js";
import { chatView } from "./chat.js";
import { modelsView } from "./models.js";
import { usageView } from "./usage.js";

const VIEWS = { chat: chatView, models: modelsView, usage: usageView, admin: adminView };
const main = document.getElementById("main");
const header = document.querySelector("header.top");
let me = null;
let leaving = null; // the current view's clean-up (a chat stream to stop)

async function start() {
  try {
    me = await api("GET", "/api/session");
  } catch {
    me = null;
  }
  route();
}

function route() {
  if (leaving) leaving();
  leaving = null;
  clear(main);
  if (!me) {
    header.hidden = true;
    main.append(signInView());
    return;
  }
  header.hidden = false;
  header.querySelector(".who").textContent = me.name + (me.is_admin ? " (admin)" : "");
  header.querySelector(".admin-only").hidden = !me.is_admin;
  const name = location.hash.replace(/^#\//, "") || "chat";
  const view = VIEWS[name] ?? chatView;
  for (const link of header.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#/${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `chatgate · ${name}`;
  leaving = view(main, me) ?? null;
}

function signInView() {
  const token = h("input", {
    type: "password", name: "token", id: "token", autocomplete: "off", required: true,
    placeholder: "cg_…", spellcheck: false,
  });
  const status = h("div", { className: "status", "aria-live": "polite" });
  const form = h(
    "form", { className: "card sign-in", onsubmit: submit },
    h("h1", {}, "Sign in to chatgate"),
    h("label", { htmlFor: "token" }, "API token"),
    token,
    h("p", { className: "hint" }, "The token is exchanged for a session cookie; the page does not keep it."),
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  async function submit(event) {
    event.preventDefault();
    clear(status);
    try {
      // The token goes in the Authorization header, once; the answer sets an HttpOnly cookie.
      me = await api("POST", "/api/session", undefined, { authorization: `Bearer ${token.value.trim()}` });
      token.value = "";
      if (!location.hash) location.hash = "#/chat";
      route();
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }
  queueMicrotask(() => token.focus());
  return form;
}

header.querySelector(".sign-out").addEventListener("click", async () => {
  try {
    await api("DELETE", "/api/session");
  } finally {
    me = null;
    route();
  }
});

window.addEventListener("hashchange", route);
window.addEventListener("chatgate:signed-out", () => {
  if (me) {
    me = null;
    route();
  }
});
start();
