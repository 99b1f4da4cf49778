// The fleet report's pager (launcher/report.py): shows one page of cards and draws the shown
// cards' thumbnails and loss curves from the embedded data, once each.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("fleet-data").textContent);
  var subjects = data.subjects, pageSize = data.page_size;
  var cards = document.getElementById("cards");
  var nodes = Array.prototype.slice.call(cards.children);  // in rank order: nodes[i] is subjects[i]
  var order = nodes.slice(), page = 0;
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text, ns) {
    var e = ns ? document.createElementNS(SVG, tag) : document.createElement(tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3); }

  // loss against step, with both axes, their end values and names
  function curve(points) {
    var w = 300, h = 140, left = 46, bottom = 30, top = 8, right = 10;
    var svg = el("svg", {width: w, height: h, "class": "curve", role: "img", "aria-label": "loss curve"}, undefined, true);
    if (points.length < 2) { svg.appendChild(el("text", {x: 10, y: 20}, "fewer than two loss points", true)); return svg; }
    var xs = points.map(function (p) { return p[0]; }), ys = points.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    var pw = w - left - right, ph = h - top - bottom, sx = pw / ((x1 - x0) || 1), sy = ph / ((y1 - y0) || 1);
    var pts = points.map(function (p) {
      return (left + (p[0] - x0) * sx).toFixed(1) + "," + (top + ph - (p[1] - y0) * sy).toFixed(1);
    }).join(" ");
    svg.appendChild(el("line", {x1: left, y1: top + ph, x2: left + pw, y2: top + ph}, undefined, true));
    svg.appendChild(el("line", {x1: left, y1: top, x2: left, y2: top + ph}, undefined, true));
    [[x0, "start"], [(x0 + x1) / 2, "middle"], [x1, "end"]].forEach(function (t) {
      var x = left + (t[0] - x0) * sx;
      svg.appendChild(el("line", {x1: x, y1: top + ph, x2: x, y2: top + ph + 3}, undefined, true));
      svg.appendChild(el("text", {x: x, y: top + ph + 13, "text-anchor": t[1]}, String(Math.round(t[0])), true));
    });
    [y0, (y0 + y1) / 2, y1].forEach(function (v) {
      var y = top + ph - (v - y0) * sy;
      svg.appendChild(el("text", {x: left - 4, y: y + 3, "text-anchor": "end"}, fmt(v), true));
    });
    svg.appendChild(el("text", {x: left + pw / 2, y: h - 3, "text-anchor": "middle", "class": "label"}, "step", true));
    svg.appendChild(el("text", {x: 9, y: top + ph / 2, "class": "label", "text-anchor": "middle",
                                transform: "rotate(-90 9 " + (top + ph / 2) + ")"}, "loss", true));
    svg.appendChild(el("polyline", {points: pts}, undefined, true));
    return svg;
  }

  function row(label, images, id) {
    var r = el("div", {"class": "row " + label});
    r.appendChild(el("b", {}, label));
    images.forEach(function (src, i) { r.appendChild(el("img", {src: src, alt: id + " " + label + " " + i})); });
    return r;
  }

  function draw(node) {
    if (node.dataset.drawn) return;
    node.dataset.drawn = "1";
    var s = subjects[+node.dataset.i], body = node.querySelector(".body");
    if (s.photos) body.appendChild(row("photos", s.photos, s.id));
    if (s.samples) body.appendChild(row("samples", s.samples, s.id));
    if (s.base) body.appendChild(row("base", s.base, s.id));
    if (s.curve) body.appendChild(curve(s.curve));
  }

  function show() {
    var pages = Math.max(1, Math.ceil(order.length / pageSize));
    page = Math.min(Math.max(page, 0), pages - 1);
    var first = page * pageSize, last = first + pageSize;
    nodes.forEach(function (n) { n.hidden = true; });
    order.forEach(function (n, i) {
      if (i >= first && i < last) { n.hidden = false; draw(n); }
    });
    document.getElementById("page-info").textContent =
      " page " + (page + 1) + " of " + pages + " (" + order.length + " subjects) ";
  }

  function arrange() {
    var key = document.getElementById("order").value, text = document.getElementById("filter").value.trim();
    var value = function (n) { return subjects[+n.dataset.i][key]; };
    order = nodes.filter(function (n) { return !text || subjects[+n.dataset.i].id.indexOf(text) >= 0; });
    if (key === "id") order.sort(function (a, b) { return value(a) < value(b) ? -1 : 1; });
    else if (key !== "rank") {
      var sign = key === "loss" ? -1 : 1;  // the worst first: the highest loss, the lowest score
      order.sort(function (a, b) {
        var va = value(a), vb = value(b);
        if (va === undefined) return 1;
        if (vb === undefined) return -1;
        return sign * (va - vb);
      });
    }
    order.forEach(function (n) { cards.appendChild(n); });
    page = 0;
    show();
  }

  function reveal() {  // a link to #subject-<id>: the page that holds it
    var id = decodeURIComponent(location.hash.slice(1)), node = document.getElementById(id);
    var at = order.indexOf(node);
    if (at < 0 && node) { document.getElementById("filter").value = ""; arrange(); at = order.indexOf(node); }
    if (at >= 0) { page = Math.floor(at / pageSize); show(); node.scrollIntoView(); }
  }

  document.getElementById("order").addEventListener("change", arrange);
  document.getElementById("filter").addEventListener("input", arrange);
  document.getElementById("prev").addEventListener("click", function () { page -= 1; show(); });
  document.getElementById("next").addEventListener("click", function () { page += 1; show(); });
  window.addEventListener("hashchange", reveal);
  show();
  if (location.hash.indexOf("#subject-") === 0) reveal();
  var ms = performance.now();
  document.body.dataset.renderedMs = ms.toFixed(0);
  document.getElementById("rendered").textContent = "page drawn " + ms.toFixed(0) + " ms after navigation";
})();
