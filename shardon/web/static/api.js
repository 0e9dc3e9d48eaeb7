// Calls to the admin API, authenticated by the session cookie (sent by the browser, never read
// here) and, for calls that change something, the session's CSRF token.

let csrf = '';

export function setCsrf(token) {
  csrf = token;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function withQuery(path, query) {
  if (!query) return path;
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  const text = q.toString();
  return text ? `${path}?${text}` : path;
}

export async function api(path, {method = 'GET', body, query} = {}) {
  const headers = {Accept: 'application/json'};
  if (method !== 'GET') headers['X-Shardon-CSRF'] = csrf;
  let payload;
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  const resp = await fetch(withQuery(path, query), {method, headers, body: payload, credentials: 'same-origin', cache: 'no-store'});
  if (resp.status === 401) {
    location.assign('/ui/login');
    throw new ApiError(401, 'signed out');
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, (data && data.error && data.error.message) || `${resp.status} ${resp.statusText}`);
  return data;
}
