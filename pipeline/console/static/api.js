// Calls to the worker's API with the key the user typed (sessionStorage: gone with the tab, never in a URL).
const KEY = "cdp.apiKey";

export function apiKey() { return sessionStorage.getItem(KEY) || ""; }
export function setApiKey(key) { key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY); }

// An answer that is not 2xx: the RFC 9457 problem the worker sent (or one made from the status).
export class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export async function api(method, path, { query, body } = {}) {
  const headers = { Accept: "application/json, application/problem+json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const url = path + (query ? `?${new URLSearchParams(query)}` : "");
  let r;
  try {
    r = await fetch(url, { method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiProblem(0, { title: "Network error", detail: `the worker did not answer (${e.message})` });
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!r.ok) {
    const problem = data && typeof data === "object" ? data
      : { title: r.statusText || "Error", status: r.status, detail: text.slice(0, 300) };
    throw new ApiProblem(r.status, problem);
  }
  return data;
}
