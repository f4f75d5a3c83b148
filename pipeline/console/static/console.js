// The console's shell: the API key form, and the page named by the URL's hash (#/page?state).
import { apiKey, setApiKey } from "./api.js";
import { renderLookup } from "./lookup.js";
import { renderAudiences } from "./audiences.js";
import { renderPrivacy } from "./privacy.js";
import { renderSimulator } from "./simulator.js";
import { renderDestinations } from "./destinations.js";

const PAGES = {
  lookup: renderLookup, audiences: renderAudiences, simulator: renderSimulator, destinations: renderDestinations,
  privacy: renderPrivacy,
};

export function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  return { page: parts[0] || "lookup", rest: parts.slice(1), params: new URLSearchParams(query || "") };
}

// A new URL state: pushed (a new history entry) or replaced (typing), without rendering twice.
export function go(page, params = {}, { replace = false, render = true } = {}) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""));
  const hash = `#/${page}${q.toString() ? `?${q}` : ""}`;
  if (hash === location.hash) { if (render) show(); return; }
  if (replace || !render) history.replaceState(null, "", hash);
  else history.pushState(null, "", hash);
  if (render) show();
}

let generation = 0;
export function current() { return generation; }

async function show() {
  const { page, rest, params } = route();
  const render = PAGES[page] || PAGES.lookup;
  generation += 1;  // a page's timers and late answers check it: a newer page has replaced theirs
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  main.replaceChildren();
  await render(main, { rest, params, generation });
}

function keyState() {
  document.getElementById("key-state").textContent = apiKey() ? "key set for this tab" : "no key";
}

document.getElementById("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("api-key");
  setApiKey(input.value.trim());
  input.value = "";
  keyState();
  show();
});
document.getElementById("forget-key").addEventListener("click", () => { setApiKey(""); keyState(); });
window.addEventListener("hashchange", show);
keyState();
show();
