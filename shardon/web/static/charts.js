// Small time-series charts drawn as SVG (no library): lines over the last minutes, one scale.

import {h, s} from './dom.js';
import * as f from './format.js';

const W = 600;
const H = 100;

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function paths(values, n, max) {
  const x = (i) => (n > 1 ? (i / (n - 1)) * W : W / 2);
  const y = (v) => H - (v / max) * H;
  const lines = [];
  const areas = [];
  let run = [];
  const flush = () => {
    if (run.length === 1) {
      // A lone point: a short flat stroke, which its round caps show as a dot.
      const [i, v] = run[0];
      lines.push(`M${(x(i) - 0.5).toFixed(1)},${y(v).toFixed(1)}h1`);
    } else if (run.length) {
      const pts = run.map(([i, v]) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      lines.push(`M${pts.join('L')}`);
      areas.push(`M${x(run[0][0]).toFixed(1)},${H}L${pts.join('L')}L${x(run[run.length - 1][0]).toFixed(1)},${H}Z`);
    }
    run = [];
  };
  values.forEach((v, i) => { if (v === null || v === undefined) flush(); else run.push([i, v]); });
  flush();
  return {line: lines.join(''), area: areas.join('')};
}

/**
 * A chart of series [{name, values}] over times t (unix seconds); format formats a value.
 * The caption shows each series' latest value; hovering shows the values at that time.
 */
export function lineChart({id, title, t, series, format = f.num}) {
  const n = t.length;
  const all = series.flatMap((sr) => sr.values.filter((v) => v !== null && v !== undefined));
  const max = niceMax(Math.max(0, ...all));
  const last = (sr) => { for (let i = sr.values.length - 1; i >= 0; i -= 1) if (sr.values[i] !== null && sr.values[i] !== undefined) return sr.values[i]; return null; };
  const summary = series.map((sr) => `${sr.name} ${format(last(sr))}`).join(', ');
  const svg = s('svg', {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', 'aria-hidden': 'true', focusable: 'false'},
    s('line', {class: 'grid-line', x1: 0, x2: W, y1: H / 2, y2: H / 2, 'vector-effect': 'non-scaling-stroke'}),
    s('line', {class: 'grid-line', x1: 0, x2: W, y1: 0.5, y2: 0.5, 'vector-effect': 'non-scaling-stroke'}),
    series.map((sr, i) => {
      const p = paths(sr.values, n, max);
      return s('g', {class: `s-${i + 1}`},
        i === 0 ? s('path', {class: 'area', d: p.area}) : null,
        s('path', {class: 'line', d: p.line, 'vector-effect': 'non-scaling-stroke'}));
    }));
  const cursor = s('line', {class: 'cursor', x1: 0, x2: 0, y1: 0, y2: H, 'vector-effect': 'non-scaling-stroke', visibility: 'hidden'});
  svg.append(cursor);
  const tip = h('span', {class: 'chart-tip', hidden: true});
  const box = h('div', {class: 'chart-box'}, svg, h('span', {class: 'chart-max'}, format(max)), tip);
  box.addEventListener('mousemove', (ev) => {
    const rect = box.getBoundingClientRect();
    const share = Math.max(0, Math.min(1, (ev.clientX - rect.left) / rect.width));
    const i = Math.round(share * (n - 1));
    const x = n > 1 ? (i / (n - 1)) * W : W / 2;
    cursor.setAttribute('x1', x);
    cursor.setAttribute('x2', x);
    cursor.setAttribute('visibility', 'visible');
    tip.textContent = `${f.time(t[i])} · ${series.map((sr) => `${sr.name} ${format(sr.values[i])}`).join(' · ')}`;
    tip.style.left = `${Math.max(15, Math.min(85, share * 100))}%`;
    tip.hidden = false;
  });
  box.addEventListener('mouseleave', () => { cursor.setAttribute('visibility', 'hidden'); tip.hidden = true; });
  const span = n > 1 ? ((t[n - 1] - t[0]) * n) / (n - 1) : 0; // n buckets, the last one ending now
  return h('figure', {class: 'chart', id, role: 'img', 'aria-label': `${title}, over the last ${f.duration(span)}: now ${summary}`},
    h('figcaption', null, title, h('span', {class: 'chart-now'}, series.length === 1 ? format(last(series[0])) : '')),
    box,
    series.length > 1 ? h('div', {class: 'chart-legend'}, series.map((sr, i) => h('span', {class: `s-${i + 1}`}, `${sr.name} ${format(last(sr))}`))) : null,
    h('div', {class: 'chart-axis'}, h('span', null, `−${f.duration(span)}`), h('span', null, 'now')));
}
