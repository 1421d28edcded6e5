// The live /mail page (B5). The server renders the list; this script keeps it current:
// snapshots arrive over a WebSocket on the same port, or by polling the JSON API where the
// WebSocket cannot connect. Everything from mail goes in through textContent: never markup.
"use strict";
(function () {
  var page = document.getElementById("page");
  if (!page) return;
  var list = document.getElementById("held");
  var empty = document.getElementById("empty");
  var notice = document.getElementById("notice");
  var storeLine = document.getElementById("store");
  var liveLine = document.getElementById("live");
  var shown = document.getElementById("shown");
  var lang = page.dataset.lang === "en" ? "en" : "ja";
  var token = page.dataset.token;
  var extendSeconds = parseInt(page.dataset.extend, 10) || 300;
  // Server time minus browser time: countdowns follow the gateway's clock.
  var offset = parseFloat(page.dataset.now) - Date.now() / 1000 || 0;
  var POLL_MS = 2000;
  var RETRY_LIVE_MS = 30000;
  var LEAVE_MS = 4000; // how long a cancelled or sent message says so before it goes
  var MAX_LISTED = 3;

  var TEXT = {
    ja: {
      no_subject: "(件名なし)", from: "差出人", to: "宛先", cc: "Cc", bcc: "Bcc",
      bcc_count: "{n} 件", more: "ほか {n} 件", size: "サイズ", received: "受付",
      release: "送信予定", left: "あと {t}", due: "送信中…", cancel: "取り消す",
      send: "今すぐ送信", extend: "+5 分", cancelled: "取り消しました。送信されません。",
      sent: "送信しました。", extended: "保留を 5 分延長しました。",
      gone: "もう保留されていません。", refused: "受け付けられませんでした。再読み込みしてください。",
      failed: "ゲートウェイに接続できません。", store: "保管: {messages} / {max_messages} 通、{bytes} / {max_bytes}",
      live: "自動更新中", polling: "自動更新中 (定期確認)", shown: "表示 {t}"
    },
    en: {
      no_subject: "(no subject)", from: "From", to: "To", cc: "Cc", bcc: "Bcc",
      bcc_count: "{n} recipient(s)", more: "{n} more", size: "Size", received: "Received",
      release: "Sends at", left: "{t} left", due: "sending…", cancel: "Cancel",
      send: "Send now", extend: "+5 min", cancelled: "Cancelled: it will not be sent.",
      sent: "Released: it is being sent now.", extended: "Hold extended by 5 minutes.",
      gone: "No longer held.", refused: "Refused. Reload the page and try again.",
      failed: "Cannot reach the gateway.", store: "Store: {messages} / {max_messages} messages, {bytes} / {max_bytes}",
      live: "Updating live", polling: "Updating (polling)", shown: "Shown at {t}"
    }
  };

  function tr(key, values) {
    var text = TEXT[lang][key];
    for (var name in values || {}) text = text.split("{" + name + "}").join(String(values[name]));
    return text;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clock(epoch) {
    var d = new Date(epoch * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  function sizeText(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / (1024 * 1024)).toFixed(1) + " MB";
  }

  function remaining(seconds) {
    if (seconds <= 0) return tr("due");
    var s = Math.floor(seconds + 0.999);
    var m = Math.floor(s / 60);
    s = s % 60;
    return tr("left", { t: m + ":" + (s < 10 ? "0" : "") + s });
  }

  // Controls that could reorder or hide text are shown as escapes, as the server does.
  function inert(text) {
    return String(text).replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u202a-\u202e\u2066-\u2069\u200e\u200f]/g,
      function (c) {
        if (c === "\u0000") return "\ufffd";
        return "\\u" + ("000" + c.charCodeAt(0).toString(16).toUpperCase()).slice(-4);
      });
  }

  function addresses(kind, items) {
    var wrap = el("div", "rcpt " + kind);
    var dt = el("dt", null, tr(kind) + " ");
    dt.appendChild(el("span", "count", "(" + items.length + ")"));
    var dd = el("dd");
    var ul = el("ul");
    items.slice(0, MAX_LISTED).forEach(function (a) { ul.appendChild(el("li", null, inert(a))); });
    dd.appendChild(ul);
    if (items.length > MAX_LISTED) {
      var details = el("details");
      details.appendChild(el("summary", null, tr("more", { n: items.length - MAX_LISTED })));
      var rest = el("ul");
      items.slice(MAX_LISTED).forEach(function (a) { rest.appendChild(el("li", null, inert(a))); });
      details.appendChild(rest);
      dd.appendChild(details);
    }
    wrap.appendChild(dt);
    wrap.appendChild(dd);
    return wrap;
  }

  function button(id, action) {
    var form = el("form");
    form.method = "post";
    form.action = "/mail/" + id + "/" + action;
    var hidden = el("input");
    hidden.type = "hidden";
    hidden.name = "token";
    hidden.value = token;
    var b = el("button", action, tr(action));
    b.type = "submit";
    b.dataset.action = action;
    form.appendChild(hidden);
    form.appendChild(b);
    return form;
  }

  function pair(dl, label, value, cls) {
    var div = el("div");
    div.appendChild(el("dt", null, label));
    div.appendChild(el("dd", cls, value));
    dl.appendChild(div);
  }

  function buildItem(m) {
    var li = el("li", "mail");
    li.id = "m-" + m.id;
    li.dataset.id = m.id;
    var head = el("div", "head");
    var subject = el("h2", "subject");
    if (m.subject) subject.textContent = inert(m.subject);
    else subject.appendChild(el("span", "none", tr("no_subject")));
    head.appendChild(subject);
    var countdown = el("span", "countdown");
    countdown.setAttribute("role", "timer");
    head.appendChild(countdown);
    li.appendChild(head);
    var dl = el("dl");
    pair(dl, tr("from"), inert(m.from || m.sender || ""), "from");
    if (m.to.length) dl.appendChild(addresses("to", m.to));
    if (m.cc.length) dl.appendChild(addresses("cc", m.cc));
    if (m.bcc_count) {
      var bcc = el("div", "rcpt bcc");
      bcc.appendChild(el("dt", null, tr("bcc")));
      bcc.appendChild(el("dd", "bcc-count", tr("bcc_count", { n: m.bcc_count })));
      dl.appendChild(bcc);
    }
    var meta = el("div", "meta");
    meta.appendChild(el("dt", null, tr("received")));
    meta.appendChild(el("dd", null, clock(m.received_at)));
    meta.appendChild(el("dt", null, tr("release")));
    meta.appendChild(el("dd", "release-at"));
    meta.appendChild(el("dt", null, tr("size")));
    meta.appendChild(el("dd", "size", sizeText(m.size)));
    dl.appendChild(meta);
    li.appendChild(dl);
    var actions = el("div", "actions");
    ["cancel", "send", "extend"].forEach(function (a) { actions.appendChild(button(m.id, a)); });
    li.appendChild(actions);
    var status = el("p", "status");
    status.setAttribute("role", "status");
    li.appendChild(status);
    return li;
  }

  function setRelease(li, releaseAt) {
    li.dataset.releaseAt = String(releaseAt);
    var dd = li.querySelector(".release-at");
    if (dd) dd.textContent = clock(releaseAt);
  }

  function tick() {
    var now = Date.now() / 1000 + offset;
    var rows = list.querySelectorAll("li.mail:not(.leaving)");
    for (var i = 0; i < rows.length; i++) {
      var c = rows[i].querySelector(".countdown");
      if (c) c.textContent = remaining(parseFloat(rows[i].dataset.releaseAt) - now);
    }
  }

  function updateEmpty() {
    empty.hidden = list.querySelector("li.mail") !== null;
  }

  // A message that left the list says why, in place, for a few seconds.
  function leave(li, key) {
    if (li.classList.contains("leaving")) return;
    li.classList.add("leaving", key);
    li.querySelector(".countdown").textContent = "";
    var buttons = li.querySelectorAll("button");
    for (var i = 0; i < buttons.length; i++) buttons[i].disabled = true;
    li.querySelector(".status").textContent = tr(key);
    setTimeout(function () { li.remove(); updateEmpty(); }, LEAVE_MS);
  }

  function apply(snapshot) {
    if (snapshot.token) token = snapshot.token;
    if (typeof snapshot.now === "number") offset = snapshot.now - Date.now() / 1000;
    var seen = {};
    var previous = null;
    snapshot.held.forEach(function (m) {
      seen[m.id] = true;
      var li = document.getElementById("m-" + m.id);
      if (!li || li.classList.contains("leaving")) {
        if (li) return;
        li = buildItem(m);
        li.classList.add("new");
        if (previous && previous.nextSibling) list.insertBefore(li, previous.nextSibling);
        else if (previous) list.appendChild(li);
        else list.insertBefore(li, list.firstChild);
      }
      setRelease(li, m.release_at);
      previous = li;
    });
    var rows = list.querySelectorAll("li.mail");
    for (var i = 0; i < rows.length; i++) {
      if (!seen[rows[i].dataset.id]) leave(rows[i], "gone");
    }
    var s = snapshot.store;
    if (s && storeLine) {
      storeLine.textContent = tr("store", {
        messages: s.messages, max_messages: s.max_messages,
        bytes: sizeText(s.bytes), max_bytes: sizeText(s.max_bytes)
      });
    }
    if (shown) shown.textContent = tr("shown", { t: clock(Date.now() / 1000 + offset) });
    updateEmpty();
    tick();
  }

  function showNotice(key) {
    notice.textContent = tr(key);
    notice.hidden = false;
  }

  // --- updates: WebSocket first, polling where it cannot connect ---------------------------
  var socket = null;
  var pollTimer = null;

  function setLive(state) {
    liveLine.dataset.state = state;
    liveLine.textContent = state === "off" ? "" : tr(state);
  }

  function refresh() {
    return fetch("/api/held", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(apply)
      .catch(function () { /* keep what is shown; the next poll tries again */ });
  }

  function startPolling() {
    if (pollTimer !== null) return;
    setLive("polling");
    refresh();
    pollTimer = setInterval(refresh, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  function connect() {
    if (socket !== null || typeof WebSocket !== "function") {
      if (socket === null) startPolling();
      return;
    }
    var ws;
    try {
      ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/live");
    } catch (e) {
      startPolling();
      setTimeout(connect, RETRY_LIVE_MS);
      return;
    }
    socket = ws;
    ws.onopen = function () { stopPolling(); setLive("live"); };
    ws.onmessage = function (event) {
      try { apply(JSON.parse(event.data)); } catch (e) { /* a bad frame is dropped */ }
    };
    ws.onclose = function () {
      socket = null;
      startPolling();
      setTimeout(connect, RETRY_LIVE_MS);
    };
  }

  // --- actions without reload ----------------------------------------------------------------
  var ACTION = /^\/mail\/([0-9a-f]+|all)\/(cancel|send|extend)$/;

  function post(path, body) {
    return fetch(path, {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Matte-Token": token, "Content-Type": "application/json" },
      body: JSON.stringify(body || {})
    });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var match = ACTION.exec(new URL(form.action, location.href).pathname);
    if (!match) return;
    event.preventDefault();
    var id = match[1], action = match[2];
    var body = action === "extend" ? { seconds: extendSeconds } : {};
    post("/api/held/" + id + "/" + action, body).then(function (r) {
      if (r.status === 403) { showNotice("refused"); return; }
      var done = action === "cancel" ? "cancelled" : action === "send" ? "sent" : "extended";
      if (id === "all") {
        var rows = list.querySelectorAll("li.mail");
        for (var i = 0; i < rows.length; i++) leave(rows[i], done);
      } else if (r.ok && action !== "extend") {
        var li = document.getElementById("m-" + id);
        if (li) leave(li, done);
      } else if (r.ok) {
        var row = document.getElementById("m-" + id);
        if (row) {
          var status = row.querySelector(".status");
          status.textContent = tr("extended");
          setTimeout(function () { status.textContent = ""; }, LEAVE_MS);
        }
      } else {
        var gone = document.getElementById("m-" + id);
        if (gone) leave(gone, "gone");
      }
      if (socket === null) refresh();
    }).catch(function () { showNotice("failed"); });
  });

  // The server-rendered list shows times in the gateway's zone; redraw in the browser's.
  var rows = list.querySelectorAll("li.mail");
  for (var i = 0; i < rows.length; i++) setRelease(rows[i], parseFloat(rows[i].dataset.releaseAt));
  setInterval(tick, 1000);
  tick();
  connect();
})();
