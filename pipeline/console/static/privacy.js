// Privacy: file an erasure request for an identity and follow its status until the pipeline has done it.
import { api } from "./api.js";
import { current, go } from "./console.js";
import { field, h, problemView, table, when } from "./dom.js";

const POLL_MS = 1000;

export async function renderPrivacy(main, { params, generation }) {
  const nsInput = h("input", { id: "erase-namespace", name: "namespace", list: "erase-namespaces",
    value: params.get("namespace") || "Email", required: true });
  const idInput = h("input", { id: "erase-id", name: "id", required: true, size: 34, spellcheck: "false" });
  const suppress = h("input", { id: "erase-suppress", type: "checkbox", name: "suppress" });
  const form = h("form", { class: "inline", "aria-label": "File an erasure request" },
    field("Namespace", nsInput),
    h("datalist", { id: "erase-namespaces" }, ["Email", "Phone", "CRMID", "ECID"].map((n) => h("option", { value: n }))),
    field("Identity", idInput),
    h("label", { class: "check" }, suppress, "also suppress (drop later records naming it)"),
    h("button", { type: "submit" }, "File erasure request"));
  const out = h("div", { id: "erasure-result", "aria-live": "polite" });
  main.append(h("section", {}, h("h2", { tabindex: "-1", id: "page-title" }, "Privacy: erasure"),
    h("p", { class: "muted" }, "Erases the person an identity belongs to: profile, identities, memberships ",
      "(exited with reason erasure) and their keys on the compacted topics. Needs the privacy:erase scope."),
    form), out);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    out.replaceChildren(h("p", { class: "muted" }, "Filing…"));
    try {
      const started = await api("DELETE", "/profiles", { query: {
        namespace: nsInput.value.trim(), id: idInput.value.trim(), suppress: suppress.checked ? "true" : "false" } });
      idInput.value = "";  // the identity is not kept on the page, nor in the URL: the request id is
      go("privacy", { request: started.request });
    } catch (err) {
      out.replaceChildren(problemView(err));
    }
  });
  const request = params.get("request");
  if (!request) { idInput.focus(); return; }
  out.append(h("p", { class: "muted" }, `Request ${request}…`));
  // follow the status until done (or until another page replaced this one)
  while (current() === generation) {
    let status;
    try {
      status = await api("GET", `/privacy/erasures/${encodeURIComponent(request)}`);
    } catch (err) {
      out.replaceChildren(problemView(err));
      return;
    }
    if (current() !== generation) return;
    out.replaceChildren(statusView(status));
    if (status.status === "done") return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function statusView(st) {
  const rows = [["Request", h("span", { class: "mono", id: "erasure-request" }, st.request)],
    ["Status", h("strong", { id: "erasure-status", class: st.status === "done" ? "ok" : "" }, st.status)],
    ["Requested", when(st.requested_ms)], ["Suppressed", st.suppress ? "yes" : "no"]];
  if (st.status === "done") {
    rows.push(["Done", when(st.done_ms)], ["Profile found", st.found ? "yes" : "no"],
      ["Erased", Object.entries(st.erased || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "nothing"]);
  }
  return h("section", {}, h("h3", {}, "Erasure request"), table(["", ""], rows));
}
