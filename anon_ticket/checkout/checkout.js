// The checkout page (README, "Checkout page"): draws a payment id here, builds its integrated
// address from GET /api/v1/info, follows it over the watch websocket (README, "Watch
// protocol"), redeems it once it is claimable and shows the token. The payment id is kept in
// localStorage so that a reload resumes; it leaves the browser only to be watched and
// redeemed on this site.
(function (root) {
  "use strict";
  var at = root.AnonTicket, doc = root.document;
  var STORE = "anon-ticket.checkout";
  var PING_SECS = 25, SILENT_SECS = 60, MAX_BACKOFF_SECS = 30;

  function $(id) { return doc.getElementById(id); }
  function show(el, on) { el.hidden = !on; }
  function text(el, value) { el.textContent = value; }

  var info = null;     // GET /api/v1/info
  var pid = null;      // hex
  var address = null;
  var ws = null, wsSeq = 0, subscribed = false, refused = null;
  var attempts = 0, retryTimer = null, countdownTimer = null;
  var lastHeard = 0;
  var watch = null;    // {status, balance}: what the server told us
  var token = null, redeeming = false, redeemTimer = null, redeemTries = 0;
  var lastPhase = null;

  // --- storage: the payment id survives a reload ---------------------------------------
  function load() {
    try {
      var saved = JSON.parse(root.localStorage.getItem(STORE) || "null");
      return saved && at.isPaymentId(saved.pid) ? saved : null;
    } catch (e) {
      return null;
    }
  }

  function save() {
    try {
      root.localStorage.setItem(STORE, JSON.stringify({ pid: pid, amount: $("amount").value }));
      return true;
    } catch (e) {
      return false;
    }
  }

  function forgetStored() {
    try { root.localStorage.removeItem(STORE); } catch (e) { /* nothing kept */ }
  }

  // --- what the payer sees ----------------------------------------------------------------
  function log(message) {
    var li = doc.createElement("li"), time = new Date().toTimeString().slice(0, 8);
    text(li, time + "  " + message);
    $("log").appendChild(li);
  }

  function phase(name, message, progress) {
    var status = $("status");
    status.dataset.phase = name;
    text(status, message);
    var bar = $("progress");
    show(bar, progress !== undefined);
    if (progress !== undefined) bar.value = progress;
    var key = name + "|" + message;
    if (key !== lastPhase) { lastPhase = key; log(message); }
  }

  function connection(state, message) {
    var el = $("connection");
    el.dataset.state = state;
    text(el, message);
    show(el, state !== "open");
    show($("reconnect"), state === "retrying");
  }

  function xmr(atomic) { return at.formatXmr(atomic) + " XMR"; }

  function showBalance() {
    var b = watch && watch.balance ? watch.balance : 0;
    show($("balance"), b > 0);
    text($("balance"), "Credited to this payment id: " + xmr(b) + ".");
  }

  function showPending(pending) {
    // Transfers seen but not credited yet (a state's optional `pending` list): the deepest.
    var best = null;
    pending.forEach(function (p) {
      if (best === null || (p.confirmations || 0) > (best.confirmations || 0)) best = p;
    });
    if (best === null) return false;
    if (best.confirmations > 0) confirmations(best.confirmations, best.required, best.amount);
    else seen(best.amount, best.in_pool);
    return true;
  }

  function seen(amount, inPool) {
    phase("seen", "Payment of " + xmr(amount) + " seen " + (inPool
      ? "in the pool: waiting for it to be mined." : "in a block."), 0);
  }

  function confirmations(k, n, amount) {
    phase("confirming", k + " of " + n + " confirmations" +
      (amount ? " for " + xmr(amount) : "") + ".", n ? Math.min(k / n, 1) : 0);
  }

  // --- the address, the URI and the QR code ------------------------------------------------
  function amountAtomic() {
    var v = at.parseXmr($("amount").value), min = BigInt(info.min_payment_amount);
    var err = $("amount-error");
    if (v === null || v < min) {
      text(err, v === null ? "Enter an amount in XMR, like 0.5." :
        "Below the minimum: a transfer under " + xmr(min) + " is not credited.");
      show(err, true);
      return null;
    }
    show(err, false);
    return v;
  }

  function drawPayment() {
    if (!address) return;
    var amount = amountAtomic();
    var uri = "monero:" + address + (amount === null ? "" : "?tx_amount=" + at.formatXmr(amount));
    $("uri").href = uri;
    text($("uri-text"), uri);
    var box = $("qr");
    while (box.firstChild) box.removeChild(box.firstChild);
    var qr = at.qrEncode(new TextEncoder().encode(uri), { ecl: "M" });
    box.dataset.version = qr.version;
    box.dataset.mask = qr.mask;
    box.appendChild(at.qrSvg(doc, qr, uri));
    save();
  }

  // --- the watch websocket -----------------------------------------------------------------
  function watchUrl() {
    return (root.location.protocol === "https:" ? "wss://" : "ws://") + root.location.host +
      "/api/v1/watch";
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    if (ws) { var old = ws; ws = null; wsSeq++; old.close(); }
    connection("connecting", "Connecting to the payment watcher…");
    var id = ++wsSeq, sock;
    try {
      sock = new WebSocket(watchUrl());
    } catch (e) {
      retry("cannot open the connection");
      return;
    }
    ws = sock;
    subscribed = false;
    refused = null;
    var opened = 0;
    sock.onopen = function () {
      if (id !== wsSeq) return;
      opened = lastHeard = Date.now();
      connection("open", "");
      // A fresh subscribe each time: its state says where the payment stands now.
      sock.send(JSON.stringify({ op: "subscribe", pid: pid }));
    };
    sock.onmessage = function (ev) {
      if (id !== wsSeq) return;
      lastHeard = Date.now();
      var m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      if (m.type === "pong" || m.type === "error" || m.pid === pid) handle(m);
    };
    sock.onclose = function (ev) {
      if (id !== wsSeq) return;
      ws = null;
      if (opened && Date.now() - opened > 10000) attempts = 0;  // it had worked a while
      var why = {
        1001: "the server is restarting or draining",
        1006: "the connection broke",
        1009: "a message was too big",
        1013: "the server has too many connections",
        4008: "this page fell behind"
      }[ev.code] || "the connection closed (" + ev.code + ")";
      retry(refused || why);
    };
  }

  function retry(why) {
    attempts++;
    var delay = Math.min(MAX_BACKOFF_SECS, Math.pow(2, attempts - 1)) *
      (0.8 + 0.4 * Math.random());
    var due = Date.now() + delay * 1000;
    function tick() {
      var left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      connection("retrying", "Lost the live status: " + why + ". Reconnecting in " + left +
        " s (attempt " + attempts + "). Your payment id is safe: payments made meanwhile are " +
        "still credited, and this page catches up when it reconnects.");
    }
    tick();
    clearInterval(countdownTimer);
    countdownTimer = setInterval(tick, 1000);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay * 1000);
  }

  function keepalive() {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - lastHeard > SILENT_SECS * 1000) { ws.close(); return; }  // a dead link
    ws.send(JSON.stringify({ op: "ping" }));
  }

  function handle(m) {
    switch (m.type) {
      case "state":
        attempts = 0;
        subscribed = true;
        watch = { status: m.status, balance: m.balance };
        showBalance();
        if (m.status === "waiting") {
          // `pending` (transfers seen, not credited yet) may be absent: then what this page
          // saw before a reconnect stands until the next announcement.
          var before = $("status").dataset.phase;
          if (Array.isArray(m.pending) ? !showPending(m.pending)
              : before !== "seen" && before !== "confirming") {
            phase("waiting", "Waiting for your payment: nothing seen yet.");
          }
        } else {
          settled();
        }
        break;
      case "payment_seen":
        if (!watch || watch.status === "waiting") seen(m.amount, m.in_pool);
        else log("Another payment of " + xmr(m.amount) + " seen.");
        break;
      case "confirmations":
        if (!watch || watch.status === "waiting") confirmations(m.confirmations, m.required);
        break;
      case "payment_confirmed":
        committed(m);
        watch.status = "claimable";
        log("Payment of " + xmr(m.amount) + " confirmed and credited.");
        settled();
        break;
      case "claimed":
        committed(m);
        watch.status = "claimed";
        settled();
        break;
      case "topped_up":
        committed(m);
        log("A further payment of " + xmr(m.amount) + " was credited to the token.");
        break;
      case "revoked":
        committed(m);
        watch.status = "revoked";
        settled();
        break;
      case "reorg":
        committed(m);
        log("A payment of " + xmr(m.amount) + " vanished from the chain (a reorganization).");
        if (!m.claimed && watch.balance <= 0) {
          watch.status = "waiting";
          phase("waiting", "Waiting for your payment: the one seen left the chain.");
        }
        break;
      case "error":
        log("The watcher said: " + m.error);
        if (!subscribed && ws) {  // the subscribe was refused: try again later
          refused = "the watcher refused (" + m.error + ")";
          ws.close();
        }
        break;
    }
  }

  // A committed fact (it carries the balance, if any, after it).
  function committed(m) {
    if (!watch) watch = { status: "waiting", balance: 0 };
    if (typeof m.balance === "number") watch.balance = m.balance;
    showBalance();
  }

  // claimable, claimed or revoked: redeem (again: a retry returns the same token)
  function settled() {
    if (watch.status === "revoked") {
      phase("revoked", "This ticket's token was revoked by the operator.", 1);
      if (!token) redeem();
      return;
    }
    if (token) {
      phase("redeemed", "Redeemed: your token is below.", 1);
      return;
    }
    phase("claimable", "Payment confirmed: claimable. Redeeming…", 1);
    redeem();
  }

  // --- redeem ---------------------------------------------------------------------------
  function redeem() {
    if (redeeming) return;
    redeeming = true;
    clearTimeout(redeemTimer);
    fetch("/api/v1/redeem", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ pid: pid }),
      cache: "no-store",
      credentials: "omit"
    }).then(function (resp) {
      return resp.json().then(function (body) { return { resp: resp, body: body }; });
    }).then(function (r) {
      redeeming = false;
      if (r.resp.status === 200 && r.body.service_token) {
        redeemTries = 0;
        showToken(r.body.service_token, r.body.status);
        if (watch) { watch.balance = r.body.balance; showBalance(); }
        return;
      }
      var wait = Number(r.resp.headers.get("Retry-After")) || 3;
      redeemLater(wait, r.body.error || "HTTP " + r.resp.status);
    }, function () {
      redeeming = false;
      redeemLater(3, "no answer");
    });
  }

  function redeemLater(secs, why) {
    redeemTries++;
    var delay = Math.min(MAX_BACKOFF_SECS, secs * redeemTries);
    log("Redeem did not succeed yet (" + why + "); trying again in " + delay + " s.");
    redeemTimer = setTimeout(redeem, delay * 1000);
  }

  function showToken(value, status) {
    token = value;
    text($("token"), value);
    show($("token-box"), true);
    show($("token-wait"), false);
    if (watch && watch.status === "revoked") return;
    phase("redeemed", status === "already_claimed"
      ? "Redeemed earlier: your token is below." : "Redeemed: your token is below.", 1);
  }

  // --- copy buttons ---------------------------------------------------------------------
  function copy(el, done) {
    var value = el.textContent;
    function byHand() {
      var range = doc.createRange();
      range.selectNodeContents(el);
      var sel = root.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      var ok = false;
      try { ok = doc.execCommand("copy"); } catch (e) { ok = false; }
      done(ok ? "Copied." : "Selected: copy it with your keyboard.");
    }
    if (root.navigator.clipboard && root.isSecureContext) {
      root.navigator.clipboard.writeText(value).then(function () { done("Copied."); }, byHand);
    } else {
      byHand();
    }
  }

  // --- start, resume, forget ------------------------------------------------------------
  function start(saved) {
    pid = saved ? saved.pid : at.toHex(at.newPaymentId());
    address = at.integratedAddress(info.primary_address, at.fromHex(pid));
    watch = null;
    token = null;
    lastPhase = null;
    text($("pid"), pid);
    text($("address"), address);
    text($("network"), info.network || "");
    show($("token-box"), false);
    show($("token-wait"), true);
    text($("token"), "");
    while ($("log").firstChild) $("log").removeChild($("log").firstChild);
    var amount = $("amount");
    amount.value = saved && saved.amount && at.parseXmr(saved.amount) !== null ? saved.amount
      : at.formatXmr(info.min_payment_amount);
    drawPayment();
    if (!save()) {
      log("This browser does not keep the payment id across reloads: write it down.");
    }
    log(saved ? "Resumed payment id " + pid + "." : "Drew payment id " + pid + ".");
    phase("connecting", "Connecting…");
    attempts = 0;
    connect();
  }

  var forgetArmed = null;
  function forget() {
    var button = $("forget");
    if (!forgetArmed) {
      text(button, "Click again to forget it (write it down first)");
      forgetArmed = setTimeout(function () {
        forgetArmed = null;
        text(button, "Forget this payment id");
      }, 5000);
      return;
    }
    clearTimeout(forgetArmed);
    forgetArmed = null;
    text(button, "Forget this payment id");
    clearTimeout(redeemTimer);
    redeeming = false;
    wsSeq++;
    if (ws) { ws.close(); ws = null; }
    forgetStored();
    start(null);
  }

  function setup(message) {
    text($("setup"), message);
    show($("setup"), true);
  }

  function boot() {
    show($("app"), true);
    $("amount").addEventListener("input", drawPayment);
    $("forget").addEventListener("click", forget);
    $("reconnect").addEventListener("click", function () { attempts = 0; connect(); });
    $("copy-token").addEventListener("click", function () {
      copy($("token"), function (msg) { text($("copied"), msg); });
    });
    $("copy-address").addEventListener("click", function () {
      copy($("address"), function (msg) { log(msg === "Copied." ? "Address copied." : msg); });
    });
    root.addEventListener("online", function () { if (!ws) { attempts = 0; connect(); } });
    setInterval(keepalive, PING_SECS * 1000);
    var tries = 0;
    (function fetchInfo() {
      fetch("/api/v1/info", { cache: "no-store", credentials: "omit" }).then(function (r) {
        return r.json();
      }).then(function (body) {
        if (!body.primary_address) throw new Error("no primary address yet");
        try {
          at.parsePrimary(body.primary_address);
        } catch (e) {
          setup("This service's primary address is not usable: " + e.message + ".");
          return;
        }
        info = body;
        show($("setup"), false);
        text($("min-amount"), at.formatXmr(info.min_payment_amount));
        show($("checkout"), true);
        start(load());
      }).catch(function () {
        tries++;
        var wait = Math.min(MAX_BACKOFF_SECS, Math.pow(2, tries));
        setup("The service does not know its payment address yet (its wallet has not " +
          "answered). Trying again in " + wait + " s…");
        setTimeout(fetchInfo, wait * 1000);
      });
    })();
  }

  // For tests and the curious: what the page holds, and a message handled as if the watch
  // socket had brought it.
  at.checkout = {
    state: function () {
      return { pid: pid, address: address, watch: watch, token: token, attempts: attempts };
    },
    receive: function (m) { if (m && m.pid === pid) handle(m); }
  };
  if (doc.readyState === "loading") doc.addEventListener("DOMContentLoaded", boot);
  else boot();
})(window);
