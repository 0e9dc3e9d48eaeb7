// Audit: who changed what through the admin API (and who signed in here), newest first
// (GET /admin/audit).

import {api} from './api.js';
import {h, pageHead, table} from './dom.js';
import * as f from './format.js';

const LIMIT = 50;

function detail(value) {
  if (value === null || value === undefined) return '—';
  if (typeof value === 'object') {
    const parts = Object.entries(value).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`);
    return parts.length ? parts.join(' · ') : '—';
  }
  return String(value);
}

export default {
  title: 'Audit',
  poll: 0,
  async mount(root, route, ctx) {
    const offset = Math.max(0, Number(route.params.get('offset')) || 0);
    const page = await api('/admin/audit', {query: {limit: LIMIT, offset}});
    const rows = page.data;
    const go = (n) => ctx.navigate(n ? `#/audit?offset=${n}` : '#/audit');
    root.append(
      pageHead('Audit', h('button', {type: 'button', class: 'ghost', onclick: () => ctx.navigate(location.hash || '#/audit')}, 'Refresh')),
      h('section', {class: 'panel'},
        table([
          {label: 'When', cell: (e) => h('span', {title: f.datetime(e.at)}, f.time(e.at))},
          {label: 'Who', cell: (e) => e.actor || '—'},
          {label: 'Action', cell: (e) => h('code', null, e.action)},
          {label: 'Target', cell: (e) => (e.target ? h('code', {class: 'wrap'}, e.target) : '—')},
          {label: 'Detail', cell: (e) => h('span', {class: 'small wrap'}, detail(e.detail))},
        ], rows, {empty: 'Nothing has been changed yet.', rowAttrs: (e) => ({dataset: {action: e.action}})}),
        h('div', {class: 'pager'},
          h('span', {class: 'count'}, page.total ? `${f.int(offset + 1)}–${f.int(offset + rows.length)} of ${f.int(page.total)}` : ''),
          h('button', {type: 'button', class: 'ghost', disabled: offset === 0, onclick: () => go(Math.max(0, offset - LIMIT))}, '← Newer'),
          h('button', {type: 'button', class: 'ghost', disabled: offset + LIMIT >= page.total, onclick: () => go(offset + LIMIT)}, 'Older →'))));
    return {};
  },
};
