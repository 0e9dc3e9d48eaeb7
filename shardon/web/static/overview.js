// Overview: rates, latency, queue, in-flight and errors now and over the last minutes, per model
// and per node (GET /admin/overview).

import {api} from './api.js';
import {lineChart} from './charts.js';
import {badge, fill, h, meter, pageHead, segmented, table} from './dom.js';
import * as f from './format.js';

const WINDOWS = [[300, '5 min'], [900, '15 min'], [3600, '1 h']];
const POINTS = 60;

function card(id, label, value, sub, data, kind) {
  return h('div', {class: ['card', kind], id: `card-${id}`, dataset: data},
    h('div', {class: 'card-label'}, label),
    h('div', {class: 'card-value'}, value),
    h('div', {class: 'card-sub'}, sub));
}

function errorShare(entry) {
  return entry.requests ? entry.failed / entry.requests : null;
}

function perSecond(values, step) {
  return values.map((v) => (v === null || v === undefined ? null : v / step));
}

export default {
  title: 'Overview',
  poll: 5000,
  async mount(root, route, ctx) {
    const windowS = WINDOWS.find(([s]) => String(s) === route.params.get('window'))?.[0] || 900;
    const label = WINDOWS.find(([s]) => s === windowS)[1];
    const cards = h('div', {class: 'cards', id: 'cards'});
    const charts = h('div', {class: 'charts', id: 'charts'});
    const byModel = h('div');
    const byNode = h('div');
    root.append(
      pageHead('Overview', h('span', {class: 'updated'}),
        segmented('Window', WINDOWS, windowS, (s) => ctx.navigate(`#/overview?window=${s}`))),
      cards, charts,
      h('section', {class: 'panel', 'aria-labelledby': 'by-model'}, h('h2', {id: 'by-model'}, `Per model, last ${label}`), byModel),
      h('section', {class: 'panel', 'aria-labelledby': 'by-node'}, h('h2', {id: 'by-node'}, `Per node, last ${label}`), byNode));

    async function refresh() {
      const d = await api('/admin/overview', {query: {window: windowS, points: POINTS}});
      const t = d.totals;
      const r = d.recent;
      const share = errorShare(t);
      root.dataset.since = String(d.since);
      fill(cards,
        card('rps', 'Requests/s', f.rate(r.requests_per_s), `${f.num(t.requests)} in ${label}`,
          {value: r.requests_per_s, total: t.requests}),
        card('tps', 'Tokens/s', f.rate(r.tokens_per_s), `${f.num(t.tokens)} tokens in ${label}`,
          {value: r.tokens_per_s, total: t.tokens}),
        card('errors', 'Error rate', f.pct(share), `${f.num(t.failed)} failed of ${f.num(t.requests)}`,
          {value: share, failed: t.failed, total: t.requests}, share > 0.05 ? 'bad' : null),
        card('ttft', 'TTFT p50', f.ms(t.ttft_ms.p50), `p99 ${f.ms(t.ttft_ms.p99)}`,
          {p50: t.ttft_ms.p50, p99: t.ttft_ms.p99}),
        card('inflight', 'In flight', f.num(d.in_flight), `capacity ${f.num(d.capacity)}`,
          {value: d.in_flight, capacity: d.capacity}),
        card('queued', 'Queued', f.num(d.queued), 'waiting', {value: d.queued}));
      const sr = d.series;
      const step = d.step_s;
      fill(charts,
        lineChart({id: 'chart-requests', title: 'Requests/s', t: sr.t, format: f.rate,
          series: [{name: 'all', values: perSecond(sr.requests, step)}, {name: 'failed', values: perSecond(sr.failed, step)}]}),
        lineChart({id: 'chart-tokens', title: 'Tokens/s', t: sr.t, format: f.rate,
          series: [{name: 'tokens', values: perSecond(sr.tokens, step)}]}),
        lineChart({id: 'chart-ttft', title: 'Time to first token', t: sr.t, format: f.ms,
          series: [{name: 'p50', values: sr.ttft_p50}, {name: 'p99', values: sr.ttft_p99}]}),
        lineChart({id: 'chart-load', title: 'In flight and queued (peak)', t: sr.t, format: f.num,
          series: [{name: 'in flight', values: sr.in_flight}, {name: 'queued', values: sr.queued}]}));
      const span = Math.max(1, d.now - d.since);
      fill(byModel, table([
        {label: 'Model', cell: (m) => h('code', null, m.model)},
        {label: 'Requests', num: true, cell: (m) => f.num(m.requests)},
        {label: 'Req/s', num: true, cell: (m) => f.rate(m.requests / span)},
        {label: 'Errors', num: true, cell: (m) => f.pct(errorShare(m))},
        {label: 'Tokens', num: true, cell: (m) => f.num(m.tokens)},
        {label: 'TTFT p50', num: true, cell: (m) => f.ms(m.ttft_ms.p50)},
        {label: 'TTFT p99', num: true, cell: (m) => f.ms(m.ttft_ms.p99)},
        {label: 'Queued', num: true, cell: (m) => f.num(m.queued)},
      ], d.models, {empty: 'No model yet.', rowAttrs: (m) => ({dataset: {model: m.model}})}));
      fill(byNode, table([
        {label: 'Node', cell: (n) => h('code', {class: 'wrap'}, n.node)},
        {label: 'Health', cell: (n) => (n.live ? badge(n.healthy ? 'healthy' : 'unhealthy', n.healthy ? 'ok' : 'bad') : badge('gone', null))},
        {label: 'In flight', cell: (n) => (n.live ? meter(n.in_flight, n.capacity, `${n.in_flight} / ${n.capacity}`, 'in flight') : '—')},
        {label: 'Requests', num: true, cell: (n) => f.num(n.requests)},
        {label: 'Errors', num: true, cell: (n) => f.pct(errorShare(n))},
        {label: 'TTFT p50', num: true, cell: (n) => f.ms(n.ttft_ms.p50)},
        {label: 'TTFT p99', num: true, cell: (n) => f.ms(n.ttft_ms.p99)},
      ], d.nodes, {empty: 'No node yet.', rowAttrs: (n) => ({dataset: {node: n.node}})}));
    }

    await refresh();
    return {refresh};
  },
};
