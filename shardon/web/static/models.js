// Models: state, placement, memory, use; load and unload the models Shardon starts; memory per GPU
// (or the CPU budget) and per group (GET /admin/models, /admin/gpus, POST /admin/models/{name}/load|unload).

import {api, ApiError} from './api.js';
import {badge, fill, h, meter, pageHead, table} from './dom.js';
import * as f from './format.js';

const STATE_KIND = {ready: 'ok', loading: 'info', unloading: 'warn', unloaded: null, failed: 'bad', unavailable: 'bad'};

function deviceLabel(dev, mode, groups) {
  const base = dev.index === 'cpu' || mode === 'cpu' ? 'CPU memory budget' : `GPU ${dev.index}${dev.name ? ` · ${dev.name}` : ''}`;
  const member = Object.entries(groups || {}).filter(([, ds]) => ds.map(String).includes(String(dev.index))).map(([g]) => g);
  return member.length ? `${base} (group ${member.join(', ')})` : base;
}

function memoryBar(title, total, models, other, id) {
  const free = Math.max(0, total - models - other);
  return h('div', {class: 'memory-row', id},
    h('div', {class: 'memory-head'}, h('strong', null, title),
      h('span', {class: 'muted'}, `${f.mb(models)} models · ${f.mb(other)} other · ${f.mb(free)} free of ${f.mb(total)}`)),
    meter([{value: models}, {value: other, kind: 'other'}], total, `${f.pct(total ? (models + other) / total : 0)} used`, title));
}

function memoryPanel(gpus) {
  const devices = gpus.devices || [];
  const rows = devices.map((d) => memoryBar(deviceLabel(d, gpus.mode, gpus.groups), d.total_mb, d.reserved_by_models_mb,
    Math.max(0, d.used_mb - d.reserved_by_models_mb), `memory-${d.index}`));
  const byIndex = Object.fromEntries(devices.map((d) => [String(d.index), d]));
  for (const [group, members] of Object.entries(gpus.groups || {})) {
    const ds = members.map((i) => byIndex[String(i)]).filter(Boolean);
    if (ds.length < 2) continue; // a group of one device is that device's bar
    const total = ds.reduce((a, d) => a + d.total_mb, 0);
    const models = ds.reduce((a, d) => a + d.reserved_by_models_mb, 0);
    const other = ds.reduce((a, d) => a + Math.max(0, d.used_mb - d.reserved_by_models_mb), 0);
    rows.push(memoryBar(`Group ${group} (${members.join(', ')})`, total, models, other, `memory-group-${group}`));
  }
  return [
    h('div', {class: 'memory'}, rows.length ? rows : h('p', {class: 'muted'}, 'No device.')),
    h('div', {class: 'legend', 'aria-hidden': 'true'}, h('span', null, h('i'), 'models'), h('span', null, h('i', {class: 'other'}), 'other'),
      h('span', null, h('i', {class: 'free'}), 'free')),
  ];
}

export default {
  title: 'Models',
  poll: 3000,
  async mount(root, _route, ctx) {
    const busy = new Map(); // model → 'load' | 'unload' while its call runs
    const memory = h('section', {class: 'panel', 'aria-labelledby': 'memory-title'});
    const list = h('section', {class: 'panel', 'aria-labelledby': 'models-title'});
    root.append(pageHead('Models', h('span', {class: 'updated'})), list, memory);

    async function act(model, action) {
      busy.set(model, action);
      render();
      try {
        const row = await api(`/admin/models/${encodeURIComponent(model)}/${action}`, {method: 'POST'});
        ctx.toast(`${model}: ${row.state || (action === 'load' ? 'ready' : 'unloaded')}`);
      } catch (err) {
        ctx.toast(`${model}: ${action} failed: ${err.message}`, 'bad');
      } finally {
        busy.delete(model);
        await refresh();
      }
    }

    let rows = [];
    function render() {
      fill(list, h('h2', {id: 'models-title'}, 'Models'), table([
        {label: 'Model', cell: (m) => h('div', null, h('code', null, m.name),
          m.aliases && m.aliases.length ? h('div', {class: 'small muted'}, `also ${m.aliases.join(', ')}`) : null)},
        {label: 'State', cell: (m) => h('div', null, badge(m.state, STATE_KIND[m.state], {class: 'state'}),
          m.error ? h('div', {class: 'small', style: {color: 'var(--bad)'}}, m.error) : null)},
        {label: 'Backend', cell: (m) => m.backend},
        {label: 'Where', cell: (m) => h('span', null, m.where ? m.where.split(',').join(', ') : '—', m.precision ? h('span', {class: 'muted'}, ` · ${m.precision}`) : null)},
        {label: 'Memory', num: true, cell: (m) => (m.memory_estimate_mb || m.memory_measured_mb
          ? h('div', null, h('div', null, `${f.mb(m.memory_estimate_mb)} est.`),
            h('div', {class: 'small muted'}, `${f.mb(m.memory_measured_mb)} measured`)) : '—')},
        {label: 'In flight', num: true, cell: (m) => f.num(m.in_flight)},
        {label: 'Queued', num: true, cell: (m) => f.num(m.queued)},
        {label: 'Last used', cell: (m) => f.ago(m.last_used)},
        {label: 'Pinned', cell: (m) => (m.backend === 'remote' ? h('span', {class: 'muted'}, 'remote') : m.pinned ? badge('pinned', 'info') : 'no')},
        {label: 'Actions', cell: (m) => {
          if (m.backend === 'remote') return h('span', {class: 'muted small'}, 'on its node');
          const running = busy.get(m.name);
          const loaded = m.state === 'ready' || m.state === 'loading';
          return h('div', {class: 'actions'},
            h('button', {type: 'button', class: 'small', dataset: {focusKey: `load:${m.name}`, action: 'load'},
              disabled: Boolean(running) || loaded, 'aria-busy': running === 'load' ? 'true' : null,
              'aria-label': `Load ${m.name}`, onclick: () => act(m.name, 'load')}, running === 'load' ? 'Loading…' : 'Load'),
            h('button', {type: 'button', class: 'small ghost', dataset: {focusKey: `unload:${m.name}`, action: 'unload'},
              disabled: Boolean(running) || m.state === 'unloaded',
              'aria-busy': running === 'unload' ? 'true' : null, 'aria-label': `Unload ${m.name}`,
              onclick: () => act(m.name, 'unload')}, running === 'unload' ? 'Unloading…' : 'Unload'));
        }},
      ], rows, {empty: 'No model.', rowAttrs: (m) => ({dataset: {model: m.name, state: m.state}})}));
    }

    async function refresh() {
      rows = (await api('/admin/models')).data;
      // The memory of the models Shardon starts (none: every model runs on a configured node).
      const managed = rows.some((m) => m.backend !== 'remote');
      const gpus = managed ? await api('/admin/gpus').catch((err) => {
        if (err instanceof ApiError && err.status === 404) return null;
        throw err;
      }) : null;
      render();
      if (gpus) {
        fill(memory, h('h2', {id: 'memory-title'}, gpus.mode === 'cpu' ? 'Memory (CPU budget)' : 'GPU memory'), memoryPanel(gpus));
      } else {
        fill(memory, h('h2', {id: 'memory-title'}, 'Memory'),
          h('p', {class: 'muted'}, 'Shardon starts no model here: every model runs on a configured node.'));
      }
    }

    await refresh();
    return {refresh};
  },
};
