// Building the page: small element helpers (text is always set as text, never parsed as HTML).

const SVG_NS = 'http://www.w3.org/2000/svg';
const PROPS = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'open']);

function setAttrs(el, attrs) {
  if (!attrs) return;
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    else if (key === 'dataset') for (const [k, v] of Object.entries(value)) { if (v !== null && v !== undefined) el.dataset[k] = v; }
    else if (key === 'style') Object.assign(el.style, value);
    else if (key === 'text') el.textContent = value;
    else if (PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** An HTML element: h('a', {href: '#/x', class: 'y'}, 'text', child, ...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

/**
 * Replace a region's content; the element that had focus in it (marked data-focus-key) gets it back,
 * so a refresh every few seconds never throws a keyboard user out of the page.
 */
export function fill(region, ...children) {
  const active = document.activeElement;
  const key = active && region.contains(active) ? active.dataset.focusKey : undefined;
  region.replaceChildren();
  append(region, children);
  if (key) {
    const again = region.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
    if (again && !again.disabled) again.focus();
  }
}

/**
 * A table; at phone width each row becomes a card whose cells carry their column's label.
 * columns: [{label, cell: row => content, num: bool}], options: {empty, rowAttrs: row => attrs, caption}.
 */
export function table(columns, rows, options = {}) {
  const head = h('tr', null, columns.map((c) => h('th', {class: c.num ? 'num' : null, scope: 'col'}, c.label)));
  const body = rows.length
    ? rows.map((row) => h('tr', options.rowAttrs ? options.rowAttrs(row) : null,
      columns.map((c) => h('td', {class: c.num ? 'num' : c.cls || null, 'data-label': c.label}, c.cell(row)))))
    : [h('tr', null, h('td', {class: 'empty', colspan: columns.length}, options.empty || 'Nothing yet.'))];
  return h('div', {class: 'table-wrap'},
    h('table', {class: 'stack'}, options.caption ? h('caption', {class: 'sr'}, options.caption) : null,
      h('thead', null, head), h('tbody', null, body)));
}

export function badge(text, kind, attrs = {}) {
  return h('span', {...attrs, class: ['badge', kind, attrs.class]}, text);
}

/** A bar filled to value/max, with its text ("3 / 8"). parts: [{value, kind}] for stacked bars. */
export function meter(parts, max, text, label) {
  const list = Array.isArray(parts) ? parts : [{value: parts}];
  const track = h('div', {class: 'meter-track', role: 'img', 'aria-label': label ? `${label}: ${text}` : text});
  for (const part of list) {
    const share = max > 0 ? Math.max(0, Math.min(1, part.value / max)) : 0;
    track.append(h('div', {class: ['meter-fill', part.kind], style: {width: `${(share * 100).toFixed(2)}%`}}));
  }
  return h('div', {class: 'meter'}, track, h('span', {class: 'meter-text'}, text));
}

export function pageHead(title, ...extra) {
  return h('div', {class: 'page-head'}, h('h1', {id: 'page-title', tabindex: '-1'}, title), h('span', {class: 'spacer'}), extra);
}

/** A group of toggle buttons; choose(value) is called with the one pressed. */
export function segmented(label, options, current, choose) {
  return h('div', {class: 'segmented', role: 'group', 'aria-label': label},
    options.map(([value, text]) => h('button', {
      type: 'button', 'aria-pressed': String(value === current), dataset: {value: String(value)},
      onclick: () => choose(value),
    }, text)));
}
