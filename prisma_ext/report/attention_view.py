"""An interactive attention view for the self-contained report: pick a layer, a head (or the
mean over heads) and a query token (click a patch, or a prefix token / the readout), and see
that query's attention over the image. Plain JavaScript on a canvas, no plotly, so it stays
responsive at ViT-B's 197 tokens.

    html = attention_view(patterns, readout, pixels, layout)   # a fragment for Page.raw

Data: every pattern row quantised to 8 bits relative to its own maximum (the row maxima are
kept as float32, so values come back within 1/510 of the row maximum), one more row per head
for the readout query (`px.readout_attention`: prefix keys 0), zlib-compressed, base64; the
page inflates it with the browser's DecompressionStream. `decode_rows` is the Python inverse
(the tests use it). When ready, the view's element carries data-ready="1" and, for what it
shows, data-shown="layer,head,query" and data-argmax (the key with the largest attention).
"""

from __future__ import annotations

import base64
import html
import json
import zlib

import numpy as np

from ..viz.overlay import png_base64, upscale

SIDE = 448  # the canvas' side in CSS pixels (about)


def encode_rows(rows: np.ndarray) -> tuple[str, str]:
    """Rows [..., n_keys] of non-negative values -> (base64 zlib of uint8 row / row max,
    base64 of the float32 row maxima)."""
    rows = np.asarray(rows, dtype=np.float32)
    top = rows.max(-1, keepdims=True)
    scaled = np.where(top > 0, rows / np.where(top > 0, top, 1), 0)
    q = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    return (base64.b64encode(zlib.compress(q.tobytes(), 6)).decode("ascii"),
            base64.b64encode(top[..., 0].astype("<f4").tobytes()).decode("ascii"))


def decode_rows(data: str, maxima: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `encode_rows` (up to quantisation): rows of `shape` [..., n_keys]."""
    q = np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=np.uint8).reshape(shape)
    top = np.frombuffer(base64.b64decode(maxima), dtype="<f4").reshape(shape[:-1])
    return q.astype(np.float32) / 255 * top[..., None]


def attention_view(patterns: np.ndarray, readout: np.ndarray, pixels: np.ndarray, layout,
                   anchor: str = "attention-view") -> str:
    """The view as an HTML fragment. patterns [layer, head, query, key] (one image), readout
    [layer, head, patch] (the readout query's attention over the patches), pixels HxWx3 uint8
    at the model's input size."""
    n_layers, n_heads, n_tokens, _ = patterns.shape
    readout_row = np.zeros((n_layers, n_heads, 1, n_tokens), dtype=np.float32)
    readout_row[..., 0, layout.n_prefix:] = readout
    rows = np.concatenate([patterns.astype(np.float32), readout_row], axis=2)  # query n_tokens = readout
    data, maxima = encode_rows(rows)
    big, _ = upscale(pixels)
    spec = {"layers": n_layers, "heads": n_heads, "tokens": n_tokens, "prefix": layout.n_prefix,
            "grid": list(layout.grid), "names": list(layout.prefix_names), "data": data, "maxima": maxima,
            "image": f"data:image/png;base64,{png_base64(big)}"}
    payload = json.dumps(spec).replace("</", "<\\/")  # raw text inside <script>: only "</" could end it
    buttons = "".join(f'<button type="button" data-query="{i}">{html.escape(name)}</button>'
                      for i, name in enumerate(layout.prefix_names))
    return f"""
<div class="attention-view" id="{anchor}" data-ready="0">
<div class="controls">
<label>layer <input type="range" class="layer" min="0" max="{n_layers - 1}" value="{n_layers - 1}">
<span class="layer-value"></span></label>
<label>head <select class="head"><option value="-1">mean over heads</option>
{"".join(f'<option value="{h}">{h}</option>' for h in range(n_heads))}</select></label>
<span class="queries">query: {buttons}<button type="button" data-query="{n_tokens}">readout</button>
or click a patch</span>
<label><input type="checkbox" class="shared"> one scale (0 to 1) instead of the row's maximum</label>
</div>
<canvas width="{SIDE}" height="{SIDE}"></canvas>
<canvas class="colourbar" width="24" height="{SIDE}"></canvas>
<p class="readout-text"></p>
<script type="application/json" class="attention-data">{payload}</script>
</div>
<script>{_SCRIPT}</script>
"""


CSS = """
.attention-view { margin: 1em 0; }
.attention-view .controls { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: center; margin-bottom: .5em; }
.attention-view canvas { vertical-align: top; cursor: crosshair; }
.attention-view canvas.colourbar { cursor: default; margin-left: .5em; }
.attention-view button[aria-pressed="true"] { font-weight: 700; }
"""

_SCRIPT = r"""
(function () {
  const root = document.currentScript.previousElementSibling;
  const spec = JSON.parse(root.querySelector(".attention-data").textContent);
  const [rows, cols] = spec.grid, T = spec.tokens, Q = T + 1;
  const canvas = root.querySelector("canvas"), ctx = canvas.getContext("2d");
  const bar = root.querySelector("canvas.colourbar"), bctx = bar.getContext("2d");
  const layerInput = root.querySelector(".layer"), headInput = root.querySelector(".head");
  const shared = root.querySelector(".shared"), text = root.querySelector(".readout-text");
  const img = new Image();
  let values = null, maxima = null, query = spec.prefix > 0 ? 0 : T;
  function viridis(t) {  // a short viridis table, linearly interpolated
    const s = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
    const x = Math.min(Math.max(t, 0), 1) * (s.length - 1), i = Math.min(Math.floor(x), s.length - 2), f = x - i;
    return s[i].map((c, k) => Math.round(c + f * (s[i + 1][k] - c)));
  }
  function row(layer, head, q) {  // the attention of query q over all T keys
    const out = new Float32Array(T);
    const heads = head < 0 ? [...Array(spec.heads).keys()] : [head];
    for (const h of heads) {
      const r = (layer * spec.heads + h) * Q + q, top = maxima[r];
      for (let k = 0; k < T; k++) out[k] += values[r * T + k] / 255 * top / heads.length;
    }
    return out;
  }
  function label(q) {
    if (q === T) return "the readout query";
    if (q < spec.prefix) return "the " + spec.names[q] + " token";
    const p = q - spec.prefix;
    return "patch row " + Math.floor(p / cols) + ", col " + (p % cols);
  }
  function draw() {
    const layer = +layerInput.value, head = +headInput.value;
    root.querySelector(".layer-value").textContent = layer;
    const a = row(layer, head, query);
    let top = 0, arg = 0, prefix = 0;
    for (let k = 0; k < T; k++) { if (a[k] > top) { top = a[k]; arg = k; } if (k < spec.prefix) prefix += a[k]; }
    let patchTop = 0;
    for (let k = spec.prefix; k < T; k++) patchTop = Math.max(patchTop, a[k]);
    const scale = shared.checked ? 1 : (patchTop || 1);
    const w = canvas.width / cols, h = canvas.height / rows;
    ctx.globalAlpha = 1; ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 0.72;
    for (let p = 0; p < rows * cols; p++) {
      const c = viridis(a[spec.prefix + p] / scale);
      ctx.fillStyle = "rgb(" + c.join(",") + ")";
      ctx.fillRect((p % cols) * w, Math.floor(p / cols) * h, w + 0.5, h + 0.5);
    }
    ctx.globalAlpha = 1;
    if (query >= spec.prefix && query < T) {
      const p = query - spec.prefix;
      ctx.strokeStyle = "#ff2d55"; ctx.lineWidth = 3;
      ctx.strokeRect((p % cols) * w + 1.5, Math.floor(p / cols) * h + 1.5, w - 3, h - 3);
    }
    for (let y = 0; y < bar.height; y++) {
      const c = viridis(1 - y / (bar.height - 1));
      bctx.fillStyle = "rgb(" + c.join(",") + ")"; bctx.fillRect(0, y, bar.width, 1);
    }
    const who = head < 0 ? "L" + layer + ", mean over heads" : "L" + layer + "H" + head;
    text.textContent = who + ", query " + label(query) + ": colour 0 (dark) to " + scale.toFixed(3) +
      (shared.checked ? " (one scale)" : " (this row's largest attention on a patch)") +
      "; largest attention " + top.toFixed(3) + " on " + label(arg).replace("the readout query", "") +
      "; prefix tokens get " + (100 * prefix).toFixed(1) + "% of it.";
    root.dataset.shown = [layer, head, query].join(",");
    root.dataset.argmax = arg;
    for (const b of root.querySelectorAll("button[data-query]")) {
      b.setAttribute("aria-pressed", +b.dataset.query === query);
    }
  }
  canvas.addEventListener("click", (e) => {
    const r = canvas.getBoundingClientRect();
    const c = Math.floor((e.clientX - r.left) / r.width * cols), rr = Math.floor((e.clientY - r.top) / r.height * rows);
    query = spec.prefix + Math.min(rows - 1, Math.max(0, rr)) * cols + Math.min(cols - 1, Math.max(0, c));
    draw();
  });
  for (const b of root.querySelectorAll("button[data-query]")) {
    b.addEventListener("click", () => { query = +b.dataset.query; draw(); });
  }
  for (const el of [layerInput, headInput, shared]) el.addEventListener("input", draw);
  const bytes = Uint8Array.from(atob(spec.data), (c) => c.charCodeAt(0));
  const inflated = new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate")));
  inflated.arrayBuffer().then((buf) => {
    values = new Uint8Array(buf);
    maxima = new Float32Array(Uint8Array.from(atob(spec.maxima), (c) => c.charCodeAt(0)).buffer);
    img.onload = () => { draw(); root.dataset.ready = "1"; };
    img.src = spec.image;
  });
})();
"""
