// Admin: users and API tokens. A new token is shown once, in a read-only field, and never again.
import { api } from "./api.js";
import { append, clear, errorBox, h } from "./dom.js";

export function adminView(main, me) {
  const users = h("tbody");
  const tokens = h("tbody");
  const status = h("div", { className: "status", "aria-live": "polite" });
  const created = h("div", { className: "created-token", "aria-live": "polite" });
  const userName = h("input", { id: "user-name", name: "name", required: true, autocomplete: "off" });
  const userAdmin = h("input", { id: "user-admin", name: "is_admin", type: "checkbox" });
  const tokenUser = h("select", { id: "token-user", name: "user" });

  main.append(h("section", { className: "admin" },
    h("h1", {}, "Users and tokens"),
    status,
    h("div", { className: "columns" },
      h("div", { className: "card" },
        h("h2", {}, "Users"),
        h("form", { className: "inline", onsubmit: addUser },
          h("label", { htmlFor: "user-name" }, "Name"), userName,
          h("label", { htmlFor: "user-admin", className: "check" }, userAdmin, " admin"),
          h("button", { type: "submit" }, "Add user"),
        ),
        h("div", { className: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Role"), h("th", { scope: "col" }, "Since"))),
          users)),
      ),
      h("div", { className: "card" },
        h("h2", {}, "API tokens"),
        h("form", { className: "inline", onsubmit: addToken },
          h("label", { htmlFor: "token-user" }, "For"), tokenUser,
          h("button", { type: "submit" }, "Create token"),
        ),
        created,
        h("div", { className: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, ["Token", "User", "Created", "State", ""].map((t) => h("th", { scope: "col" }, t)))),
          tokens)),
      ),
    ),
  ));

  async function load() {
    try {
      const [{ data: userRows }, { data: tokenRows }] = await Promise.all([api("GET", "/api/users"), api("GET", "/api/tokens")]);
      append(clear(users), userRows.map((user) => h("tr", {},
        h("td", {}, user.name), h("td", {}, user.is_admin ? "admin" : "user"), h("td", {}, user.created_at.slice(0, 10)))));
      const chosen = tokenUser.value || me.name;
      append(clear(tokenUser), userRows.map((user) => h("option", { value: user.name, selected: user.name === chosen }, user.name)));
      append(clear(tokens), tokenRows.map((token) => h("tr", { dataset: { id: token.id } },
        h("td", {}, h("code", {}, `${token.prefix}…`)), h("td", {}, token.user), h("td", {}, token.created_at.slice(0, 10)),
        h("td", {}, token.revoked_at ? "revoked" : "active"),
        h("td", {}, token.revoked_at ? "" : h("button", { type: "button", className: "danger revoke", onclick: () => revoke(token) }, "Revoke")),
      )));
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }

  async function addUser(event) {
    event.preventDefault();
    clear(status);
    try {
      await api("POST", "/api/users", { name: userName.value, is_admin: userAdmin.checked });
      userName.value = "";
      userAdmin.checked = false;
      load();
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }

  async function addToken(event) {
    event.preventDefault();
    clear(status);
    try {
      const token = await api("POST", "/api/tokens", { user: tokenUser.value });
      const field = h("input", { id: "new-token", readOnly: true, value: token.token, "aria-label": "New token" });
      clear(created).append(h("p", {}, `Token for ${token.user}: copy it now, it is not shown again.`), field);
      field.select();
      load();
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }

  async function revoke(token) {
    if (!confirm(`Revoke ${token.prefix}…? Programs and sessions using it stop working.`)) return;
    try {
      await api("DELETE", `/api/tokens/${token.id}`);
      load();
    } catch (error) {
      status.append(errorBox(error.message));
    }
  }

  load();
}
