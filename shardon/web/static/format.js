// Numbers for people: 1.2k, 350 ms, 1.5 GB, "3 min ago".

const DASH = '—';

function trim(text) {
  return text.includes('.') ? text.replace(/\.?0+$/, '') : text;
}

/** A count: 950, 1.2k, 12k, 3.4M. */
export function num(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return DASH;
  const a = Math.abs(n);
  const sign = n < 0 ? '-' : '';
  if (a < 1000) return sign + trim(a.toFixed(a >= 100 || Number.isInteger(a) ? 0 : 1));
  for (const [size, unit] of [[1e3, 'k'], [1e6, 'M'], [1e9, 'B'], [1e12, 'T']]) {
    const v = a / size;
    if (v < 999.5 || unit === 'T') return sign + trim(v.toFixed(v < 10 ? 1 : 0)) + unit;
  }
  return String(n);
}

/** A count of things: 1 request, 2 requests, 1.2k requests. */
export function count(n, word) {
  return `${num(n)} ${n === 1 ? word : `${word}s`}`;
}

/** An exact count with thousands separators: 12,345. */
export function int(n) {
  if (n === null || n === undefined) return DASH;
  return Math.round(n).toLocaleString('en-US');
}

/** Per second: 0/s, 0.25/s, 3.4/s, 1.2k/s. */
export function rate(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return DASH;
  if (x === 0) return '0/s';
  if (x < 1) return `${trim(x.toFixed(2))}/s`;
  if (x < 100) return `${trim(x.toFixed(1))}/s`;
  return `${num(x)}/s`;
}

/** Milliseconds: 0.4 ms, 35 ms, 1.25 s, 2.5 min. */
export function ms(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return DASH;
  if (x < 10) return `${trim(x.toFixed(1))} ms`;
  if (x < 1000) return `${Math.round(x)} ms`;
  if (x < 60000) return `${trim((x / 1000).toFixed(x < 10000 ? 2 : 1))} s`;
  if (x < 3600000) return `${trim((x / 60000).toFixed(1))} min`;
  return `${trim((x / 3600000).toFixed(1))} h`;
}

/** A share: 0%, 0.5%, 12.5%, 100%. */
export function pct(fraction) {
  if (fraction === null || fraction === undefined || Number.isNaN(fraction)) return DASH;
  const p = fraction * 100;
  if (p === 0) return '0%';
  if (p < 0.1) return '<0.1%';
  return `${trim(p.toFixed(1))}%`;
}

/** Megabytes: 512 MB, 1.5 GB, 24 GB. */
export function mb(x) {
  if (x === null || x === undefined) return DASH;
  if (x < 1024) return `${Math.round(x)} MB`;
  const g = x / 1024;
  return `${trim(g.toFixed(g < 10 ? 1 : 0))} GB`;
}

/** Bytes: 820 B, 1.2 kB, 3.4 MB. */
export function bytes(x) {
  if (x === null || x === undefined) return DASH;
  if (x < 1000) return `${x} B`;
  if (x < 1e6) return `${trim((x / 1e3).toFixed(1))} kB`;
  if (x < 1e9) return `${trim((x / 1e6).toFixed(1))} MB`;
  return `${trim((x / 1e9).toFixed(1))} GB`;
}

/** A duration in seconds: 45 s, 12 min, 3 h 5 min, 2 d 4 h. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const hours = Math.floor(m / 60);
  if (hours < 24) return m % 60 ? `${hours} h ${m % 60} min` : `${hours} h`;
  const d = Math.floor(hours / 24);
  return hours % 24 ? `${d} d ${hours % 24} h` : `${d} d`;
}

/** How long ago a unix time was: just now, 42 s ago, 3 min ago. */
export function ago(unix, now = Date.now() / 1000) {
  if (unix === null || unix === undefined) return DASH;
  const d = now - unix;
  if (d < 5) return 'just now';
  return `${duration(d)} ago`;
}

const pad = (n) => String(n).padStart(2, '0');

/** A unix time as the local clock: 14:03:22 today, else "Mar 3, 14:03". */
export function time(unix, now = new Date()) {
  if (unix === null || unix === undefined) return DASH;
  const d = new Date(unix * 1000);
  const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (d.toDateString() === now.toDateString()) return clock;
  return `${d.toLocaleDateString('en-US', {month: 'short', day: 'numeric'})}, ${clock.slice(0, 5)}`;
}

/** A unix time in full, local: 2025-03-03 14:03:22.123. */
export function datetime(unix) {
  if (unix === null || unix === undefined) return DASH;
  const d = new Date(unix * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}
