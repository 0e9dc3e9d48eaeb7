// Requests: the request log with filters (status, model, tenant, node, time range) and pages
// (GET /admin/requests), and one request with its receipt and timings (GET /admin/requests/{id}).
// The filters live in the address (#/requests?status=4xx&offset=50), so back and forward work.

import {api} from './api.js';
import {badge, h, pageHead, table} from './dom.js';
import * as f from './format.js';

const STATUSES = [['', 'Any status'], ['2xx', '2xx success'], ['4xx', '4xx client error'], ['5xx', '5xx server error'],
  ['400', '400'], ['401', '401'], ['403', '403'], ['404', '404'], ['429', '429 rate limited'], ['499', '499 client gone'],
  ['502', '502'], ['503', '503'], ['504', '504']];
const RANGES = [['15m', 'Last 15 min', 900], ['1h', 'Last hour', 3600], ['24h', 'Last 24 hours', 86400],
  ['7d', 'Last 7 days', 604800], ['all', 'Any time', null], ['custom', 'Between…', null]];
const DEFAULT_RANGE = '1h';
const SIZES = ['25', '50', '100'];

export function statusKind(status) {
  if (status >= 200 && status < 300) return 'ok';
  if (status === 499 || status === 429) return 'warn';
  return 'bad';
}

function localInput(unix) {
  if (!unix) return '';
  const d = new Date(unix * 1000);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function fromLocalInput(text) {
  if (!text) return '';
  const t = new Date(text).getTime();
  return Number.isFinite(t) ? String(Math.floor(t / 1000)) : '';
}

function select(id, label, options, value) {
  return h('div', {class: 'field'}, h('label', {for: id}, label),
    h('select', {id, name: id}, options.map(([v, text]) => h('option', {value: v, selected: v === value}, text))));
}

function input(id, label, value, list, attrs = {}) {
  return h('div', {class: 'field'}, h('label', {for: id}, label),
    h('input', {id, name: id, value: value || '', list: list ? `${id}-list` : null, autocomplete: 'off', spellcheck: 'false', ...attrs}),
    list ? h('datalist', {id: `${id}-list`}, list.map((v) => h('option', {value: v}))) : null);
}

function tokens(row) {
  if (row.prompt_tokens === null && row.completion_tokens === null) return '—';
  return `${f.num(row.prompt_tokens || 0)} → ${f.num(row.completion_tokens || 0)}`;
}

async function mountList(root, route, ctx) {
  const p = route.params;
  const limit = SIZES.includes(p.get('limit')) ? Number(p.get('limit')) : 50;
  const offset = Math.max(0, Number(p.get('offset')) || 0);
  const range = RANGES.find(([k]) => k === (p.get('range') || DEFAULT_RANGE)) || RANGES[1];
  const query = {status: p.get('status'), model: p.get('model'), tenant: p.get('tenant'), node: p.get('node'), limit, offset};
  if (range[2]) query.since = Math.floor(Date.now() / 1000) - range[2];
  if (range[0] === 'custom') {
    query.since = p.get('since');
    query.until = p.get('until');
  }
  const [page, status, keys] = await Promise.all([
    api('/admin/requests', {query}),
    api('/admin/status'),
    api('/admin/keys'),
  ]);
  const tenants = [...new Set(['default', ...keys.data.map((k) => k.tenant)])].sort();

  const go = (changes) => {
    const next = new URLSearchParams(p);
    for (const [k, v] of Object.entries(changes)) {
      if (v === null || v === undefined || v === '') next.delete(k);
      else next.set(k, String(v));
    }
    const text = next.toString();
    ctx.navigate(`#/requests${text ? `?${text}` : ''}`);
  };

  const custom = range[0] === 'custom';
  const sinceField = input('since', 'From', localInput(Number(p.get('since'))), null, {type: 'datetime-local'});
  const untilField = input('until', 'Until', localInput(Number(p.get('until'))), null, {type: 'datetime-local'});
  sinceField.hidden = !custom;
  untilField.hidden = !custom;
  const form = h('form', {class: 'filters', id: 'filters', role: 'search', 'aria-label': 'Filter requests'},
    select('status', 'Status', STATUSES, p.get('status') || ''),
    input('model', 'Model', p.get('model'), status.models),
    input('tenant', 'Tenant', p.get('tenant'), tenants),
    input('node', 'Node', p.get('node'), status.nodes.map((n) => n.id)),
    select('range', 'Time', RANGES.map(([k, text]) => [k, text]), range[0]),
    sinceField, untilField,
    select('limit', 'Per page', SIZES.map((v) => [v, v]), String(limit)),
    h('div', {class: 'buttons'},
      h('button', {type: 'submit'}, 'Apply'),
      h('button', {type: 'button', class: 'ghost', onclick: () => ctx.navigate('#/requests')}, 'Reset')));
  form.elements.range.addEventListener('change', () => {
    const on = form.elements.range.value === 'custom';
    sinceField.hidden = !on;
    untilField.hidden = !on;
  });
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const el = form.elements;
    const changes = {offset: null};
    for (const name of ['status', 'model', 'tenant', 'node', 'range', 'limit']) changes[name] = el[name].value.trim();
    if (changes.range === DEFAULT_RANGE) changes.range = null;
    if (changes.limit === '50') changes.limit = null;
    changes.since = el.range.value === 'custom' ? fromLocalInput(el.since.value) : null;
    changes.until = el.range.value === 'custom' ? fromLocalInput(el.until.value) : null;
    go(changes);
  });

  const rows = page.data;
  const first = rows.length ? offset + 1 : 0;
  const back = `#/requests${p.toString() ? `?${p}` : ''}`;
  sessionStorage.setItem('shardon.requests', back);
  root.append(
    pageHead('Requests', h('button', {type: 'button', class: 'ghost', onclick: () => ctx.navigate(back)}, 'Refresh')),
    h('section', {class: 'panel'}, form),
    h('section', {class: 'panel', 'aria-labelledby': 'results'},
      h('h2', {id: 'results', class: 'sr'}, 'Results'),
      table([
        {label: 'Time', cell: (r) => h('span', {title: f.datetime(r.received_at)}, f.time(r.received_at))},
        {label: 'Status', cell: (r) => badge(String(r.status), statusKind(r.status), {class: 'status'})},
        {label: 'Model', cell: (r) => (r.model ? h('code', null, r.model) : '—')},
        {label: 'Tenant', cell: (r) => r.tenant || '—'},
        {label: 'Node', cell: (r) => (r.node_id ? h('span', {class: 'wrap'}, r.node_id) : '—')},
        {label: 'Tokens', num: true, cell: tokens},
        {label: 'TTFT', num: true, cell: (r) => f.ms(r.receipt && r.receipt.timings.ttft_ms)},
        {label: 'Duration', num: true, cell: (r) => f.ms(r.receipt && r.receipt.timings.duration_ms)},
        {label: 'Request', cell: (r) => h('a', {href: `#/requests/${r.id}`, class: 'mono', 'aria-label': `Request ${r.id}`}, r.id)},
      ], rows, {
        empty: 'No request matches.',
        rowAttrs: (r) => ({class: 'link', dataset: {id: r.id, status: String(r.status)}, onclick: (ev) => {
          if (!ev.target.closest('a')) ctx.navigate(`#/requests/${r.id}`);
        }}),
      }),
      h('div', {class: 'pager'},
        h('span', {class: 'count', id: 'count', dataset: {total: String(page.total)}},
          page.total ? `${f.int(first)}–${f.int(offset + rows.length)} of ${f.int(page.total)}` : 'No request'),
        h('button', {type: 'button', class: 'ghost', id: 'prev', disabled: offset === 0,
          onclick: () => go({offset: Math.max(0, offset - limit) || null})}, '← Newer'),
        h('button', {type: 'button', class: 'ghost', id: 'next', disabled: offset + limit >= page.total,
          onclick: () => go({offset: offset + limit})}, 'Older →'))));
  return {};
}

function timeline(t) {
  const total = t.duration_ms;
  if (!total) return null;
  const queue = t.queue_ms || 0;
  const ttft = t.ttft_ms ?? total;
  const parts = [
    ['queue', 'queued', queue],
    ['wait', 'to first byte', Math.max(0, ttft - queue)],
    ['gen', 'answering', Math.max(0, total - ttft)],
  ];
  return h('div', null,
    h('div', {class: 'timeline', role: 'img', 'aria-label': parts.map(([, l, v]) => `${l} ${f.ms(v)}`).join(', ')},
      parts.map(([cls, , v]) => h('div', {class: ['seg', cls], style: {width: `${((v / total) * 100).toFixed(2)}%`}}))),
    h('div', {class: 'legend'}, parts.map(([cls, label, v]) => h('span', null, h('i', {class: cls}), `${label} ${f.ms(v)}`)),
      h('span', null, `total ${f.ms(total)}`)));
}

async function copyText(text, ctx) {
  try {
    await navigator.clipboard.writeText(text);
    ctx.toast('Copied');
  } catch {
    ctx.toast('Copying is not allowed here: select the text instead', 'bad');
  }
}

async function mountDetail(root, route, ctx) {
  const id = route.rest[0];
  const back = sessionStorage.getItem('shardon.requests') || '#/requests';
  const link = h('a', {class: 'back', href: back}, '← Requests');
  let row;
  try {
    row = await api(`/admin/requests/${encodeURIComponent(id)}`);
  } catch (err) {
    root.append(link, pageHead(`Request ${id}`), h('p', {class: 'error-box', role: 'alert'}, err.message));
    return {};
  }
  const r = row.receipt || {};
  const facts = [
    ['Status', h('span', null, badge(String(row.status), statusKind(row.status)), row.error_type ? ` ${row.error_type}` : '')],
    ['Endpoint', h('code', null, row.endpoint)],
    ['Model', row.variant ? `${row.model} → variant ${row.variant}` : (row.model || '—')],
    ['Tenant', row.tenant || '—'],
    ['Key', row.key_id ? h('code', null, row.key_id) : '—'],
    ['Priority', row.priority || '—'],
    ['Stream', row.stream ? 'yes' : 'no'],
    ['Node', row.overflow ? `${row.node_id} (overflow endpoint)` : (row.node_id || '—')],
    ['Backend', row.backend || '—'],
    ['Retries', f.num(row.retries)],
    ['Waited for a rate limit', row.limited ? 'yes' : 'no'],
    ['Client', row.client_addr || '—'],
    ['Bytes', `${f.bytes(row.bytes_in)} in · ${f.bytes(row.bytes_out)} out`],
    ['Tokens', `${f.int(row.prompt_tokens)} prompt · ${f.int(row.completion_tokens)} completion`],
    ['Received', f.datetime(row.received_at)],
    ['Finished', f.datetime(row.finished_at)],
  ];
  const receipt = JSON.stringify(row.receipt, null, 2);
  root.append(link,
    pageHead(`Request ${id}`),
    h('div', {class: 'grid-2'},
      h('section', {class: 'panel', 'aria-labelledby': 'summary-title'},
        h('h2', {id: 'summary-title'}, 'Summary'),
        h('dl', {class: 'facts', id: 'facts'}, facts.map(([k, v]) => [h('dt', null, k), h('dd', null, v)]))),
      h('div', null,
        h('section', {class: 'panel', 'aria-labelledby': 'timing-title'},
          h('h2', {id: 'timing-title'}, 'Timings'),
          r.timings ? timeline(r.timings) : h('p', {class: 'muted'}, 'Not finished.')),
        h('section', {class: 'panel', 'aria-labelledby': 'receipt-title'},
          h('div', {class: 'page-head'}, h('h2', {id: 'receipt-title'}, 'Receipt'), h('span', {class: 'spacer'}),
            row.receipt ? h('button', {type: 'button', class: 'ghost small', id: 'copy-receipt', onclick: () => copyText(receipt, ctx)}, 'Copy') : null),
          row.receipt ? h('pre', {class: 'json', id: 'receipt', tabindex: '0'}, receipt) : h('p', {class: 'muted'}, 'No receipt yet.'),
          r.output_sha256 ? h('p', {class: 'small muted wrap'}, 'output_sha256 is the SHA-256 of the text the model generated.') : null))));
  return {};
}

export default {
  title: 'Requests',
  poll: 0,
  mount(root, route, ctx) {
    return route.rest.length ? mountDetail(root, route, ctx) : mountList(root, route, ctx);
  },
};
