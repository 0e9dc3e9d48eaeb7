// Tenants and keys: usage per tenant and key (GET /admin/stats/tenants), the keys (GET /admin/keys),
// create a key — its secret shown once, with a copy button (POST /admin/keys) — and revoke one
// (DELETE /admin/keys/{id}).

import {api} from './api.js';
import {fill, h, pageHead, segmented, table} from './dom.js';
import * as f from './format.js';

const WINDOWS = [['1h', 'Last hour', 3600], ['24h', '24 hours', 86400], ['7d', '7 days', 604800], ['all', 'All', null]];
const PRIORITIES = [['', 'Any (up to critical)'], ['low', 'low'], ['normal', 'normal'], ['high', 'high'], ['critical', 'critical']];

function usageTable(usage) {
  const rows = [];
  for (const t of usage.data) {
    rows.push({...t, name: t.tenant || '(no tenant)', sub: false});
    for (const k of t.keys) rows.push({...k, name: k.key_id || '(no key)', sub: true, tenant: t.tenant});
  }
  return table([
    {label: 'Tenant / key', cell: (r) => (r.sub ? h('code', {class: 'small'}, r.name) : h('strong', null, r.name))},
    {label: 'Requests', num: true, cell: (r) => f.num(r.requests)},
    {label: 'Failed', num: true, cell: (r) => `${f.num(r.failed)} (${f.pct(r.requests ? r.failed / r.requests : null)})`},
    {label: 'Prompt tokens', num: true, cell: (r) => f.num(r.prompt_tokens)},
    {label: 'Completion tokens', num: true, cell: (r) => f.num(r.completion_tokens)},
    {label: 'Total tokens', num: true, cell: (r) => f.num(r.total_tokens)},
  ], rows, {
    empty: 'No request in this window.',
    rowAttrs: (r) => ({class: r.sub ? 'sub' : null, dataset: r.sub ? {key: r.name} : {tenant: r.name}}),
  });
}

function limits(k) {
  const out = [];
  if (k.rpm) out.push(`${f.num(k.rpm)} req/min`);
  if (k.tpm) out.push(`${f.num(k.tpm)} tokens/min`);
  if (k.max_priority) out.push(`up to ${k.max_priority}`);
  if (k.models) out.push(`models: ${k.models.join(', ')}`);
  return out.length ? out.join(' · ') : 'none';
}

function field(id, label, control, hint) {
  return h('div', {class: 'field'}, h('label', {for: id}, label), control, hint ? h('span', {class: 'small muted', id: `${id}-hint`}, hint) : null);
}

export default {
  title: 'Tenants & keys',
  poll: 0,
  async mount(root, route, ctx) {
    const win = WINDOWS.find(([k]) => k === route.params.get('window')) || WINDOWS[1];
    const usageBox = h('div', {id: 'usage'});
    const keysBox = h('div', {id: 'keys'});
    let keys = [];
    let usage = {data: []};

    root.append(
      pageHead('Tenants & keys',
        h('button', {type: 'button', id: 'create-key', onclick: () => createDialog()}, 'Create key')),
      h('section', {class: 'panel', 'aria-labelledby': 'usage-title'},
        h('div', {class: 'page-head'}, h('h2', {id: 'usage-title'}, 'Usage'), h('span', {class: 'spacer'}),
          segmented('Usage window', WINDOWS.map(([k, l]) => [k, l]), win[0], (k) => ctx.navigate(`#/tenants?window=${k}`))),
        usageBox),
      h('section', {class: 'panel', 'aria-labelledby': 'keys-title'}, h('h2', {id: 'keys-title'}, 'Keys'), keysBox));

    async function refresh() {
      const since = win[2] ? Math.floor(Date.now() / 1000) - win[2] : undefined;
      [keys, usage] = await Promise.all([
        api('/admin/keys').then((d) => d.data),
        api('/admin/stats/tenants', {query: {since}}),
      ]);
      const used = {};
      for (const t of usage.data) for (const k of t.keys) if (k.key_id) used[k.key_id] = k;
      fill(usageBox, usageTable(usage));
      fill(keysBox, table([
        {label: 'Key', cell: (k) => h('code', null, k.id)},
        {label: 'Tenant', cell: (k) => k.tenant},
        {label: 'Limits', cell: (k) => h('span', {class: 'small'}, limits(k))},
        {label: 'From', cell: (k) => k.source},
        {label: 'Created', cell: (k) => (k.created_at ? h('span', {title: f.datetime(k.created_at)}, f.ago(k.created_at)) : '—')},
        {label: `Requests (${win[1].toLowerCase()})`, num: true, cell: (k) => f.num(used[k.id] ? used[k.id].requests : 0)},
        {label: 'Actions', cell: (k) => h('div', {class: 'actions'},
          h('button', {type: 'button', class: 'small danger', dataset: {focusKey: `revoke:${k.id}`, action: 'revoke'},
            'aria-label': `Revoke ${k.id}`, onclick: () => revoke(k)}, 'Revoke'))},
      ], keys, {empty: 'No key: /v1 is open to everyone until a key exists.', rowAttrs: (k) => ({dataset: {key: k.id}})}));
    }

    async function revoke(k) {
      const sure = await ctx.confirm('Revoke this key?',
        `Requests with ${k.id} (tenant ${k.tenant}) are refused from now on.${k.source === 'config' ? ' A key from the config comes back when Shardon restarts.' : ''}`,
        'Revoke');
      if (!sure) return;
      try {
        await api(`/admin/keys/${encodeURIComponent(k.id)}`, {method: 'DELETE'});
        ctx.toast(`${k.id} revoked`);
      } catch (err) {
        ctx.toast(`Could not revoke ${k.id}: ${err.message}`, 'bad');
      }
      await refresh();
    }

    function createDialog() {
      const tenants = [...new Set(keys.map((k) => k.tenant).concat(usage.data.map((t) => t.tenant)).filter(Boolean))].sort();
      const error = h('p', {class: 'error-box', role: 'alert', hidden: true});
      const form = h('form', {method: 'dialog', id: 'key-form'},
        h('h2', null, 'Create a key'),
        error,
        field('key-tenant', 'Tenant', h('input', {id: 'key-tenant', name: 'tenant', required: true, list: 'key-tenants', autocomplete: 'off', spellcheck: 'false'})),
        h('datalist', {id: 'key-tenants'}, tenants.map((t) => h('option', {value: t}))),
        h('div', {class: 'grid-2'},
          field('key-rpm', 'Requests/min', h('input', {id: 'key-rpm', name: 'rpm', type: 'number', min: '1', step: 'any', inputmode: 'numeric'})),
          field('key-tpm', 'Tokens/min', h('input', {id: 'key-tpm', name: 'tpm', type: 'number', min: '1', step: 'any', inputmode: 'numeric'}))),
        field('key-priority', 'Highest priority', h('select', {id: 'key-priority', name: 'max_priority'},
          PRIORITIES.map(([v, l]) => h('option', {value: v}, l)))),
        field('key-models', 'Models', h('input', {id: 'key-models', name: 'models', autocomplete: 'off', spellcheck: 'false', 'aria-describedby': 'key-models-hint'}),
          'Comma-separated; empty for every model.'),
        h('div', {class: 'buttons'},
          h('button', {type: 'button', class: 'ghost', onclick: () => dialog.close()}, 'Cancel'),
          h('button', {type: 'submit', id: 'key-submit'}, 'Create')));
      const dialog = ctx.dialog('Create a key', form);
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        const el = form.elements;
        const body = {tenant: el.tenant.value.trim()};
        if (el.rpm.value) body.rpm = Number(el.rpm.value);
        if (el.tpm.value) body.tpm = Number(el.tpm.value);
        if (el.max_priority.value) body.max_priority = el.max_priority.value;
        const models = el.models.value.split(',').map((m) => m.trim()).filter(Boolean);
        if (models.length) body.models = models;
        el['key-submit'].disabled = true;
        try {
          const created = await api('/admin/keys', {method: 'POST', body});
          showSecret(dialog, created);
          refresh().catch(() => {});
        } catch (err) {
          error.textContent = err.message;
          error.hidden = false;
          el['key-submit'].disabled = false;
        }
      });
    }

    function showSecret(dialog, created) {
      const secret = h('input', {id: 'new-secret', readonly: true, value: created.key, 'aria-label': 'The new key', spellcheck: 'false'});
      const copy = async () => {
        try {
          await navigator.clipboard.writeText(created.key);
        } catch {
          secret.select();
          document.execCommand('copy');
        }
        copyButton.textContent = 'Copied';
        ctx.toast('Key copied');
      };
      const copyButton = h('button', {type: 'button', id: 'copy-secret', onclick: copy}, 'Copy');
      fill(dialog,
        h('form', {method: 'dialog'},
          h('h2', null, 'Key created'),
          h('p', null, 'Key ', h('code', {id: 'new-key-id'}, created.id), ` for tenant ${created.tenant}.`),
          h('p', {class: 'warning'}, 'Copy the secret now: it is shown this once and never again.'),
          h('div', {class: 'secret'}, secret, copyButton),
          h('div', {class: 'buttons'}, h('button', {type: 'submit', class: 'ghost', id: 'secret-done'}, 'Done'))));
      secret.focus();
      secret.select();
    }

    await refresh();
    return {refresh};
  },
};
