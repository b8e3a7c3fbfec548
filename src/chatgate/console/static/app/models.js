// Models: list, add, edit, delete, share, and test that a model's server answers.
import { api } from "./api.js";
import { clear, errorBox, h } from "./dom.js";

const FIELDS = [
  ["name", "Name", "text", true],
  ["base_url", "Base URL", "url", false, "https://api.openai.com/v1"],
  ["model_id", "Model id (as the server names it)", "text", true],
  ["api_key", "API key", "password", false],
  ["description", "Description", "text", false],
  ["context_length", "Context length", "number", false],
];

export function modelsView(main, me) {
  const list = h("div", { className: "model-list" });
  const status = h("div", { className: "status", "aria-live": "polite" });
  const editor = h("div");
  main.append(
    h("section", { className: "models" },
      h("div", { className: "bar" },
        h("h1", {}, "Models"),
        h("button", { type: "button", className: "add-model", onclick: () => edit(null) }, "Add model"),
      ),
      status, editor, list,
    ),
  );

  async function load() {
    clear(list);
    try {
      const { data } = await api("GET", "/api/models");
      if (!data.length) list.append(h("p", { className: "empty" }, "No models yet."));
      for (const model of data) list.append(card(model));
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }

  function card(model) {
    const result = h("div", { className: "check-result", "aria-live": "polite" });
    const mine = me.is_admin || model.user_id === me.user_id;
    return h("article", { className: "card model", dataset: { id: model.id } },
      h("h2", {}, model.name, " ", h("span", { className: `badge ${model.sharing}` }, model.sharing)),
      h("dl", {},
        h("dt", {}, "Server"), h("dd", {}, model.base_url || "(OpenAI)"),
        h("dt", {}, "Model id"), h("dd", {}, model.model_id),
        h("dt", {}, "API key"), h("dd", {}, model.api_key || "(none)"),
        model.description ? [h("dt", {}, "Description"), h("dd", {}, model.description)] : null,
      ),
      h("div", { className: "actions" },
        h("button", { type: "button", className: "test", onclick: () => test(model, result) }, "Test"),
        mine ? h("button", { type: "button", className: "secondary edit", onclick: () => edit(model) }, "Edit") : null,
        mine ? h("button", { type: "button", className: "danger delete", onclick: () => remove(model) }, "Delete") : null,
      ),
      result,
    );
  }

  async function test(model, result) {
    clear(result).append(h("p", {}, "Testing…"));
    try {
      const check = await api("POST", `/api/models/${model.id}/check`);
      const line = check.chat.ok
        ? `${check.verdict === "ok" ? "OK" : "Answers"}: chat ${check.chat.latency_ms} ms, model list ${check.models.latency_ms} ms`
          + (check.models.listed === false ? ` (the server does not list ${check.model_id})` : "")
        : `Failed: ${check.chat.error}`;
      clear(result).append(h("p", { className: `verdict ${check.verdict}` }, line));
    } catch (error) {
      clear(result).append(errorBox(error.message));
    }
  }

  async function remove(model) {
    if (!confirm(`Delete the model ${model.name}?`)) return;
    try {
      await api("DELETE", `/api/models/${model.id}`);
      load();
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }

  function edit(model) {
    clear(status);
    const inputs = {};
    const rows = FIELDS.map(([name, label, type, required, placeholder]) => {
      const input = h("input", {
        id: `model-${name}`, name, type, required: required && !model,
        autocomplete: type === "password" ? "new-password" : "off",
        placeholder: name === "api_key" && model ? "unchanged (write-only)" : placeholder,
      });
      // The key is write-only: the form never shows it, only what is typed replaces it.
      if (model && name !== "api_key") input.value = model[name] ?? "";
      if (!model && name === "context_length") input.value = "4096";
      inputs[name] = input;
      return [h("label", { htmlFor: input.id }, label), input];
    });
    const sharing = h("select", { id: "model-sharing", name: "sharing" },
      ["private", "unlisted", "public"].map((value) => h("option", { value, selected: model?.sharing === value }, value)));
    const formStatus = h("div", { className: "status" });
    const form = h("form", { className: "card model-form", onsubmit: save },
      h("h2", {}, model ? `Edit ${model.name}` : "Add a model"),
      rows, h("label", { htmlFor: "model-sharing" }, "Sharing"), sharing,
      formStatus,
      h("div", { className: "actions" },
        h("button", { type: "button", className: "secondary", onclick: () => clear(editor) }, "Cancel"),
        h("button", { type: "submit" }, "Save"),
      ),
    );
    clear(editor).append(form);
    inputs.name.focus();

    async function save(event) {
      event.preventDefault();
      const body = { sharing: sharing.value };
      for (const [name, input] of Object.entries(inputs)) {
        if (name === "api_key" && !input.value && model) continue;
        body[name] = name === "context_length" ? Number(input.value || 4096) : input.value;
      }
      try {
        if (model) await api("PATCH", `/api/models/${model.id}`, body);
        else await api("POST", "/api/models", body);
        clear(editor);
        load();
      } catch (error) {
        clear(formStatus).append(errorBox(error.message));
      }
    }
  }

  load();
}
