  // Shared by the operator dashboard and the customer portal: inlined into each page's
  // <script> where it says so (app.admin.ui.read_page), so the CSP still hashes it.
  var SVG_NS = "http://www.w3.org/2000/svg";

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, String(v));
    });
  }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }

  function text(v, fallback) {
    return v === null || v === undefined || v === "" ? (fallback === undefined ? "—" : fallback) : String(v);
  }

  function int(v) {
    return typeof v === "number" && isFinite(v) ? Math.round(v).toLocaleString("en-US") : "—";
  }

  function badge(status) {
    var cls = String(status || "unknown").replace(/[^a-z_]/gi, "");
    return el("span", { "class": "badge " + cls }, text(status));
  }

  // Money stays a decimal string. For bar lengths only, read it as integer micro-USD (BigInt):
  // exact, no floating point money.
  function micros(s) {
    var m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(s === null || s === undefined ? "" : s));
    if (!m) return 0n;
    var frac = ((m[3] || "") + "000000").slice(0, 6);
    var v = BigInt(m[2]) * 1000000n + BigInt(frac);
    return m[1] ? -v : v;
  }

  function share(v, max) {
    if (max <= 0n || v <= 0n) return 0;
    return Number((v * 10000n) / max) / 10000;
  }

  function usd(s) { return s === null || s === undefined ? "—" : "$" + String(s); }

  function shortTime(iso) {
    if (!iso) return "—";
    var s = String(iso);
    return s.length >= 19 ? s.slice(5, 10) + " " + s.slice(11, 19) : s;
  }
