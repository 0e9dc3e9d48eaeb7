// Nodes: health, circuit, in-flight against capacity, models, the load each reports, and what each
// served lately (GET /admin/nodes, /admin/status, /admin/overview); drain, resume and remove a node
// (PATCH and DELETE /admin/nodes/{id}).

import {api} from './api.js';
import {badge, fill, h, meter, pageHead} from './dom.js';
import * as f from './format.js';

const CIRCUIT_KIND = {closed: 'ok', half_open: 'warn', open: 'bad'};

/** The buttons a node card offers: drain or resume it, and remove one registered at run time. */
function nodeActions(node, ctx) {
  if (node.removing) return [];
  const running = ctx.busy.get(node.id);
  const buttons = [
    h('button', {type: 'button', class: node.draining ? 'small' : 'small ghost', dataset: {action: node.draining ? 'resume' : 'drain'},
      disabled: Boolean(running), 'aria-busy': running ? 'true' : null,
      'aria-label': `${node.draining ? 'Resume' : 'Drain'} ${node.id}`,
      onclick: () => ctx.act(node, node.draining ? 'resume' : 'drain')}, node.draining ? 'Resume' : 'Drain'),
  ];
  if (node.source === 'admin') {
    buttons.push(h('button', {type: 'button', class: 'small ghost', dataset: {action: 'remove'},
      disabled: Boolean(running), 'aria-label': `Remove ${node.id}`, onclick: () => ctx.act(node, 'remove')}, 'Remove'));
  }
  return buttons;
}

function reportedLoad(load) {
  const parts = [`${f.num(load.running)} running`, `${f.num(load.waiting)} waiting`];
  if (load.kv_cache_usage !== null) parts.push(`KV cache ${f.pct(load.kv_cache_usage)}`);
  if (load.slots !== null) parts.push(`of ${f.count(load.slots, 'slot')}`);
  return h('span', {title: load.source}, parts.join(' · '));
}

function nodeCard(node, recent, ctx) {
  const state = node.circuit;
  const load = node.max_concurrent ? node.in_flight / node.max_concurrent : 0;
  const actions = nodeActions(node, ctx);
  const facts = [
    ['Circuit', h('span', null, badge(state.replace('_', '-'), CIRCUIT_KIND[state]),
      ` ${f.count(node.failures, 'consecutive failure')}`,
      node.retry_in_s !== null ? ` · trial in ${f.duration(node.retry_in_s)}` : '')],
    ['Source', node.source],
    ['Models', h('span', {class: 'chips'}, node.models.map((m) => h('span', {class: 'chip'}, m)))],
    ['Weight', f.num(node.weight)],
    ['Connections', `${f.num(node.idle_connections)} idle${node.tls ? ' · TLS' : ''}`],
  ];
  if (node.load) facts.push(['Reported load', reportedLoad(node.load)]);
  if (recent) {
    facts.push(['Last 15 min', `${f.count(recent.requests, 'request')} · ${f.pct(recent.requests ? recent.failed / recent.requests : null)} errors`]);
    facts.push(['TTFT', `p50 ${f.ms(recent.ttft_ms.p50)} · p99 ${f.ms(recent.ttft_ms.p99)}`]);
  }
  if (node.last_error) facts.push(['Last error', h('span', {class: 'small'}, node.last_error)]);
  return h('article', {class: 'panel node', 'aria-labelledby': `node-${node.id}`, dataset: {node: node.id}},
    h('div', {class: 'node-head'},
      h('h2', {id: `node-${node.id}`}, node.id),
      node.removing ? badge('removing', 'warn', {class: 'drain'}) : node.draining ? badge('draining', 'warn', {class: 'drain'}) : null,
      badge(node.healthy ? 'healthy' : 'unhealthy', node.healthy ? 'ok' : 'bad', {class: 'health'})),
    h('div', {class: 'muted small wrap'}, node.url),
    h('div', null,
      h('div', {class: 'small muted'}, 'In flight'),
      meter([{value: node.in_flight, kind: load >= 1 ? 'bad' : load >= 0.75 ? 'warn' : null}], node.max_concurrent,
        `${node.in_flight} / ${node.max_concurrent}`, 'in flight')),
    h('dl', null, facts.map(([k, v]) => [h('dt', null, k), h('dd', null, v)])),
    actions.length ? h('div', {class: 'actions'}, actions) : null);
}

export default {
  title: 'Nodes',
  poll: 5000,
  async mount(root, _route, ctx) {
    const gateway = h('section', {class: 'panel', 'aria-labelledby': 'gateway-title'});
    const list = h('div', {class: 'nodes', id: 'nodes'});
    root.append(pageHead('Nodes', h('span', {class: 'updated'})), gateway, list);

    const busy = new Map(); // node id → the action whose call runs
    const actions = {
      drain: (id) => api(`/admin/nodes/${encodeURIComponent(id)}`, {method: 'PATCH', body: {drain: true}}),
      resume: (id) => api(`/admin/nodes/${encodeURIComponent(id)}`, {method: 'PATCH', body: {drain: false}}),
      remove: (id) => api(`/admin/nodes/${encodeURIComponent(id)}`, {method: 'DELETE'}),
    };
    const done = {drain: 'draining', resume: 'takes requests again', remove: 'removed once idle'};
    async function act(node, action) {
      busy.set(node.id, action);
      try {
        await actions[action](node.id);
        ctx.toast(`${node.id}: ${done[action]}`);
      } catch (err) {
        ctx.toast(`${node.id}: ${action} failed: ${err.message}`, 'bad');
      } finally {
        busy.delete(node.id);
        await refresh();
      }
    }
    const cardCtx = {...ctx, act, busy};

    async function refresh() {
      const [status, listing, overview] = await Promise.all([
        api('/admin/status'),
        api('/admin/nodes'),
        api('/admin/overview', {query: {window: 900, points: 2}}),
      ]);
      const recent = Object.fromEntries(overview.nodes.map((n) => [n.node, n]));
      const healthy = status.nodes.filter((n) => n.healthy).length;
      const rl = status.request_log;
      fill(gateway,
        h('h2', {id: 'gateway-title'}, 'Gateway'),
        h('dl', {class: 'facts'},
          h('dt', null, 'State'), h('dd', null, status.draining ? badge('draining', 'warn') : badge('serving', 'ok')),
          h('dt', null, 'Version'), h('dd', null, status.version),
          h('dt', null, 'Up'), h('dd', null, f.duration(status.uptime_s)),
          h('dt', null, 'Nodes'), h('dd', null, `${healthy} of ${status.nodes.length} healthy`),
          h('dt', null, 'In flight'), h('dd', null, f.num(status.in_flight)),
          rl ? [h('dt', null, 'Request log'), h('dd', null,
            `${f.int(rl.written)} written · ${f.int(rl.pending)} pending · ${f.bytes(rl.backlog_bytes)} backlog · ${f.int(rl.dropped)} dropped`)] : null));
      const nodes = listing.data;
      fill(list, nodes.length
        ? nodes.map((n) => nodeCard(n, recent[n.id], cardCtx))
        : h('p', {class: 'panel empty'}, 'No node: add nodes to the config or with shardon nodes add, or models that Shardon starts.'));
    }

    await refresh();
    return {refresh};
  },
};
