// Monero integrated addresses built in the browser: Keccak-256 and Monero's base58, enough to
// turn the operator's primary address and a payment id drawn here into the address to pay
// (README, "Checkout page"). Pure functions on window.AnonTicket; nothing here touches the
// network or the page. tests/test_checkout_js.py holds them to the `monero` package.
(function (root) {
  "use strict";
  var at = root.AnonTicket = root.AnonTicket || {};
  var MASK = (1n << 64n) - 1n;

  // --- Keccak-256 (the original padding, 0x01: what Monero uses, not SHA3-256) -----------
  var RC = [], ROT = [];
  (function () {
    var r = 1;  // the round constants' LFSR, x^8 + x^6 + x^5 + x^4 + 1
    for (var i = 0; i < 24; i++) {
      var c = 0n;
      for (var j = 0; j < 7; j++) {
        if (r & 1) c |= 1n << BigInt((1 << j) - 1);
        r = (r & 0x80) ? ((r << 1) ^ 0x171) : (r << 1);
      }
      RC.push(c);
    }
    ROT[0] = 0;
    for (var t = 0, x = 1, y = 0; t < 24; t++) {  // rho offsets along pi's walk
      ROT[x + 5 * y] = ((t + 1) * (t + 2) / 2) % 64;
      var nx = y; y = (2 * x + 3 * y) % 5; x = nx;
    }
  })();

  function rotl(v, n) {
    return n === 0 ? v : ((v << BigInt(n)) | (v >> BigInt(64 - n))) & MASK;
  }

  function permute(s) {
    var c = new Array(5), b = new Array(25);
    for (var round = 0; round < 24; round++) {
      for (var x = 0; x < 5; x++) c[x] = s[x] ^ s[x + 5] ^ s[x + 10] ^ s[x + 15] ^ s[x + 20];
      for (x = 0; x < 5; x++) {
        var d = c[(x + 4) % 5] ^ rotl(c[(x + 1) % 5], 1);
        for (var y = 0; y < 25; y += 5) s[x + y] ^= d;
      }
      for (x = 0; x < 5; x++) {
        for (y = 0; y < 5; y++) b[y + 5 * ((2 * x + 3 * y) % 5)] = rotl(s[x + 5 * y], ROT[x + 5 * y]);
      }
      for (y = 0; y < 25; y += 5) {
        for (x = 0; x < 5; x++) s[x + y] = b[x + y] ^ (~b[(x + 1) % 5 + y] & MASK & b[(x + 2) % 5 + y]);
      }
      s[0] ^= RC[round];
    }
  }

  function keccak256(bytes) {
    var rate = 136, s = [];
    for (var i = 0; i < 25; i++) s.push(0n);
    var padded = new Uint8Array((Math.floor(bytes.length / rate) + 1) * rate);
    padded.set(bytes);
    padded[bytes.length] ^= 0x01;
    padded[padded.length - 1] ^= 0x80;
    for (var off = 0; off < padded.length; off += rate) {
      for (i = 0; i < rate / 8; i++) {
        var lane = 0n;
        for (var k = 7; k >= 0; k--) lane = (lane << 8n) | BigInt(padded[off + 8 * i + k]);
        s[i] ^= lane;
      }
      permute(s);
    }
    var out = new Uint8Array(32);
    for (i = 0; i < 32; i++) out[i] = Number((s[i >> 3] >> BigInt(8 * (i & 7))) & 0xffn);
    return out;
  }

  // --- Monero base58: 8-byte blocks as 11 characters, a short last block as fewer ---------
  var ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
  var ENCODED = [0, 2, 3, 5, 6, 7, 9, 10, 11];  // characters for 0..8 bytes

  function base58Encode(bytes) {
    var out = "";
    for (var off = 0; off < bytes.length; off += 8) {
      var block = bytes.subarray(off, Math.min(off + 8, bytes.length)), n = 0n, chars = "";
      for (var i = 0; i < block.length; i++) n = (n << 8n) | BigInt(block[i]);
      for (i = 0; i < ENCODED[block.length]; i++) {
        chars = ALPHABET[Number(n % 58n)] + chars;
        n /= 58n;
      }
      out += chars;
    }
    return out;
  }

  function base58Decode(text) {
    var full = Math.floor(text.length / 11), rest = text.length % 11;
    var restBytes = ENCODED.indexOf(rest);
    if (restBytes < 0) throw new Error("bad base58 length");
    var out = new Uint8Array(full * 8 + restBytes);
    for (var b = 0; b * 11 < text.length; b++) {
      var chars = text.slice(b * 11, b * 11 + 11), size = b < full ? 8 : restBytes, n = 0n;
      for (var i = 0; i < chars.length; i++) {
        var v = ALPHABET.indexOf(chars[i]);
        if (v < 0) throw new Error("bad base58 character");
        n = n * 58n + BigInt(v);
      }
      if (n >> BigInt(8 * size)) throw new Error("bad base58 block");
      for (i = size - 1; i >= 0; i--) { out[b * 8 + i] = Number(n & 0xffn); n >>= 8n; }
    }
    return out;
  }

  // --- addresses --------------------------------------------------------------------------
  // primary network byte -> [network, integrated network byte]
  var NETWORKS = { 18: ["mainnet", 19], 53: ["testnet", 54], 24: ["stagenet", 25] };
  var OTHER = { 19: "an integrated address", 54: "an integrated address",
                25: "an integrated address", 42: "a subaddress", 63: "a subaddress",
                36: "a subaddress" };

  function checksum(bytes) { return keccak256(bytes).subarray(0, 4); }

  function equal(a, b) {
    if (a.length !== b.length) return false;
    for (var i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }

  // The primary address's network and keys; an Error that says why for anything else.
  function parsePrimary(address) {
    if (typeof address !== "string" || address.length !== 95) {
      throw new Error("not a primary address (95 characters)");
    }
    var raw = base58Decode(address);
    if (raw.length !== 69 || !equal(checksum(raw.subarray(0, 65)), raw.subarray(65))) {
      throw new Error("not a Monero address (bad checksum)");
    }
    var net = NETWORKS[raw[0]];
    if (!net) throw new Error("not a primary address: " + (OTHER[raw[0]] || "unknown network"));
    if (base58Encode(raw) !== address) throw new Error("not in canonical base58 form");
    return { network: net[0], netbyte: net[1], keys: raw.slice(1, 65) };
  }

  function integratedAddress(primary, pid) {
    if (!(pid instanceof Uint8Array) || pid.length !== 8) throw new Error("payment id: 8 bytes");
    var p = parsePrimary(primary), raw = new Uint8Array(77);
    raw[0] = p.netbyte;
    raw.set(p.keys, 1);
    raw.set(pid, 65);
    raw.set(checksum(raw.subarray(0, 73)), 73);
    return base58Encode(raw);
  }

  // --- payment ids and amounts ------------------------------------------------------------
  function toHex(bytes) {
    var s = "";
    for (var i = 0; i < bytes.length; i++) s += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
    return s;
  }

  function fromHex(text) {
    if (typeof text !== "string" || !/^(?:[0-9a-fA-F]{2})*$/.test(text)) throw new Error("not hex");
    var out = new Uint8Array(text.length / 2);
    for (var i = 0; i < out.length; i++) out[i] = parseInt(text.substr(2 * i, 2), 16);
    return out;
  }

  // 8 random bytes, never all zero (the server refuses that id), from the browser's CSPRNG.
  function newPaymentId() {
    var pid = new Uint8Array(8);
    do { root.crypto.getRandomValues(pid); } while (pid.every(function (b) { return b === 0; }));
    return pid;
  }

  function isPaymentId(text) {
    return typeof text === "string" && /^[0-9a-f]{16}$/.test(text) && !/^0+$/.test(text);
  }

  var UNIT = 1000000000000n;  // piconero in one XMR

  // Piconero (a safe integer, a BigInt or a decimal string) as XMR, trailing zeros dropped.
  function formatXmr(atomic) {
    var n = BigInt(atomic), frac = (n % UNIT).toString().padStart(12, "0").replace(/0+$/, "");
    return (n / UNIT).toString() + (frac ? "." + frac : "");
  }

  // "1.5" XMR as piconero (a BigInt); null for anything that is not such a decimal.
  function parseXmr(text) {
    var m = /^\s*(\d{1,9})(?:\.(\d{0,12}))?\s*$/.exec(String(text));
    if (!m) return null;
    return BigInt(m[1]) * UNIT + BigInt((m[2] || "").padEnd(12, "0"));
  }

  at.keccak256 = keccak256;
  at.base58Encode = base58Encode;
  at.base58Decode = base58Decode;
  at.parsePrimary = parsePrimary;
  at.integratedAddress = integratedAddress;
  at.toHex = toHex;
  at.fromHex = fromHex;
  at.newPaymentId = newPaymentId;
  at.isPaymentId = isPaymentId;
  at.formatXmr = formatXmr;
  at.parseXmr = parseXmr;
})(window);
