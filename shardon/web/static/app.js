// The dashboard's frame: the session, the navigation (#/page?query), polling, dialogs and toasts.
// Each page is a module whose mount(root, route, ctx) builds it and returns {refresh}.

import {api, setCsrf} from './api.js';
import {h} from './dom.js';
import audit from './audit.js';
import models from './models.js';
import nodes from './nodes.js';
import overview from './overview.js';
import requests from './requests.js';
import tenants from './tenants.js';

const PAGES = {overview, nodes, models, requests, tenants, audit};
const main = document.getElementById('main');
let current = null; // the page shown: {token, timer, page, handle}
let mounts = 0;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return {name: parts[0] || 'overview', rest: parts.slice(1), params: new URLSearchParams(query)};
}

function toast(message, kind = 'ok') {
  const el = h('div', {class: ['toast', kind]}, message);
  document.getElementById('toasts').append(el);
  setTimeout(() => el.remove(), kind === 'bad' ? 8000 : 4000);
}

/** A modal confirmation; resolves true when confirmed. */
function confirmDialog(title, message, action = 'Confirm') {
  return new Promise((resolve) => {
    const dialog = h('dialog', {'aria-labelledby': 'confirm-title'},
      h('form', {method: 'dialog'},
        h('h2', {id: 'confirm-title'}, title),
        h('p', null, message),
        h('div', {class: 'buttons'},
          h('button', {type: 'submit', value: 'cancel', class: 'ghost', autofocus: true}, 'Cancel'),
          h('button', {type: 'submit', value: 'ok', class: 'danger', id: 'confirm-ok'}, action))));
    dialog.addEventListener('close', () => { resolve(dialog.returnValue === 'ok'); dialog.remove(); });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** A modal dialog holding `content` (a form or anything); returns the <dialog>. */
function openDialog(label, ...content) {
  const dialog = h('dialog', {'aria-label': label}, ...content);
  dialog.addEventListener('close', () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  return dialog;
}

const ctx = {
  toast,
  confirm: confirmDialog,
  dialog: openDialog,
  navigate(hash) {
    if (location.hash === hash) show(false);
    else location.hash = hash;
  },
};

function stop() {
  if (current && current.timer) clearTimeout(current.timer);
  current = null;
}

function schedule(page, handle, token) {
  if (!page.poll || !handle || !handle.refresh) return;
  const tick = async () => {
    if (!current || current.token !== token) return;
    if (!document.hidden) {
      try {
        await handle.refresh();
        markReady();
      } catch (err) {
        showError(err);
      }
    }
    if (current && current.token === token) current.timer = setTimeout(tick, page.poll);
  };
  current.timer = setTimeout(tick, page.poll);
}

function markReady() {
  main.dataset.refreshed = String(Number(main.dataset.refreshed || 0) + 1);
  const stamp = main.querySelector('.updated');
  if (stamp) stamp.textContent = `Updated ${new Date().toLocaleTimeString('en-GB')}`;
}

function showError(err) {
  let box = main.querySelector('.error-box.global');
  if (!box) {
    box = h('p', {class: 'error-box global', role: 'alert'});
    main.prepend(box);
  }
  box.textContent = `Could not load: ${err.message}`;
}

async function show(moved) {
  stop();
  const route = parseHash();
  const page = PAGES[route.name];
  for (const link of document.querySelectorAll('.side a')) {
    if (link.dataset.page === route.name) {
      link.setAttribute('aria-current', 'page');
      link.scrollIntoView({block: 'nearest', inline: 'nearest'}); // the phone's tab strip scrolls
    } else {
      link.removeAttribute('aria-current');
    }
  }
  const token = ++mounts;
  current = {token, timer: null, page, handle: null};
  main.dataset.page = route.name;
  main.dataset.mount = String(token);
  main.dataset.ready = '0';
  main.dataset.refreshed = '0';
  main.replaceChildren();
  if (!page) {
    document.title = 'Not found · Shardon';
    main.append(h('h1', {id: 'page-title', tabindex: '-1'}, 'Not found'), h('p', null, h('a', {href: '#/overview'}, 'Back to the overview')));
    main.dataset.ready = '1';
    return;
  }
  document.title = `${page.title} · Shardon`;
  let handle = null;
  try {
    handle = await page.mount(main, route, ctx);
  } catch (err) {
    if (current && current.token === token) showError(err);
  }
  if (!current || current.token !== token) return;
  current.handle = handle;
  main.dataset.ready = '1';
  markReady();
  if (moved) {
    const title = main.querySelector('#page-title');
    if (title) title.focus({preventScroll: true});
  }
  schedule(page, handle, token);
}

async function signOut() {
  try {
    await api('/ui/logout', {method: 'POST'});
  } finally {
    location.assign('/ui/login');
  }
}

async function start() {
  // The skip link moves focus to the page itself (its #main would be taken for a page's address).
  document.querySelector('.skip').addEventListener('click', (ev) => {
    ev.preventDefault();
    main.focus();
  });
  const session = await api('/ui/session');
  setCsrf(session.csrf);
  document.getElementById('version').textContent = `v${session.version}`;
  document.getElementById('who').textContent = `Signed in as ${session.actor}`;
  const out = document.getElementById('sign-out');
  out.hidden = !session.sign_out;
  out.addEventListener('click', signOut);
  document.addEventListener('visibilitychange', () => {
    // Back in view: refresh a polled page at once instead of at its next tick.
    if (!document.hidden && current && current.page && current.page.poll && current.handle) {
      current.handle.refresh().then(markReady, showError);
    }
  });
  window.addEventListener('hashchange', () => show(true));
  await show(false);
}

start().catch((err) => {
  main.replaceChildren(h('p', {class: 'error-box', role: 'alert'}, `The dashboard could not start: ${err.message}`));
});
