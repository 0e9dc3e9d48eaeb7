// Nodes: health, circuit, in-flight against capacity, models, and what each served lately
// (GET /admin/status, GET /admin/overview). Read-only for now: register, drain and remove come
// with the fleet's /admin/nodes, as buttons in each card's actions (nodeActions) and the page head.

import {api} from './api.js';
import {badge, fill, h, meter, pageHead} from './dom.js';
import * as f from './format.js';

/** The buttons a node card offers; none until the admin API can change the fleet. */
function nodeActions(_node, _ctx) {
  return [];
}

function circuit(node) {
  if (node.circuit) return node.circuit; // a registry that reports it
  return node.healthy ? 'closed' : 'open';
}

function nodeCard(node, recent, ctx) {
  const state = circuit(node);
  const load = node.max_concurrent ? node.in_flight / node.max_concurrent : 0;
  const actions = nodeActions(node, ctx);
  const facts = [
    ['Circuit', h('span', null, badge(state, state === 'closed' ? 'ok' : state === 'open' ? 'bad' : 'warn'),
      ` ${f.count(node.failures, 'consecutive failure')}`)],
    ['Models', h('span', {class: 'chips'}, node.models.map((m) => h('span', {class: 'chip'}, m)))],
    ['Weight', f.num(node.weight)],
    ['Connections', `${f.num(node.idle_connections)} idle`],
  ];
  if (node.load !== undefined) facts.push(['Reported load', String(node.load)]);
  if (recent) {
    facts.push(['Last 15 min', `${f.count(recent.requests, 'request')} · ${f.pct(recent.requests ? recent.failed / recent.requests : null)} errors`]);
    facts.push(['TTFT', `p50 ${f.ms(recent.ttft_ms.p50)} · p99 ${f.ms(recent.ttft_ms.p99)}`]);
  }
  if (node.last_error) facts.push(['Last error', h('span', {class: 'small'}, node.last_error)]);
  return h('article', {class: 'panel node', 'aria-labelledby': `node-${node.id}`, dataset: {node: node.id}},
    h('div', {class: 'node-head'},
      h('h2', {id: `node-${node.id}`}, node.id),
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

    async function refresh() {
      const [status, overview] = await Promise.all([
        api('/admin/status'),
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
      const nodes = [...status.nodes].sort((a, b) => a.id.localeCompare(b.id));
      fill(list, nodes.length
        ? nodes.map((n) => nodeCard(n, recent[n.id], ctx))
        : h('p', {class: 'panel empty'}, 'No node: add nodes to the config, or models that Shardon starts.'));
    }

    await refresh();
    return {refresh};
  },
};
