// A compact QR code encoder (model 2, byte mode, versions 1 to 40, levels L/M/Q/H), drawn
// client-side so that the checkout page needs nothing from elsewhere (README, "Checkout page").
// AnonTicket.qrEncode(bytes, {ecl, version, mask}) -> {version, ecl, mask, size, modules};
// tests/test_checkout_js.py holds its matrices to segno's for the same data, version, level
// and mask.
(function (root) {
  "use strict";
  var at = root.AnonTicket = root.AnonTicket || {};

  // Per level (index: version), error correction codewords per block and blocks per symbol.
  var ECC_PER_BLOCK = {
    L: [0, 7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28, 30, 28, 28, 28,
        28, 30, 30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
    M: [0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26, 26,
        28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28],
    Q: [0, 13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28, 28, 26, 30, 28,
        30, 30, 30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
    H: [0, 17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28, 28, 26, 28, 30,
        24, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30]
  };
  var BLOCKS = {
    L: [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 8, 9, 9, 10, 12, 12, 12,
        13, 14, 15, 16, 17, 18, 19, 19, 20, 21, 22, 24, 25],
    M: [0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20, 21,
        23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49],
    Q: [0, 1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20, 23, 23, 25, 27,
        29, 34, 34, 35, 38, 40, 43, 45, 48, 51, 53, 56, 59, 62, 65, 68],
    H: [0, 1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25, 25, 34, 30, 32,
        35, 37, 40, 42, 45, 48, 51, 54, 57, 60, 63, 66, 70, 74, 77, 81]
  };
  var FORMAT_BITS = { L: 1, M: 0, Q: 3, H: 2 };

  // Modules left for data and error correction once the function patterns are placed.
  function rawModules(v) {
    var n = (16 * v + 128) * v + 64;
    if (v >= 2) {
      var align = Math.floor(v / 7) + 2;
      n -= (25 * align - 10) * align - 55;
      if (v >= 7) n -= 36;
    }
    return n;
  }

  function dataCodewords(v, ecl) {
    return Math.floor(rawModules(v) / 8) - ECC_PER_BLOCK[ecl][v] * BLOCKS[ecl][v];
  }

  // The most bytes version v at level ecl holds in byte mode.
  function capacity(v, ecl) {
    return Math.floor((dataCodewords(v, ecl) * 8 - 4 - (v < 10 ? 8 : 16)) / 8);
  }

  function alignmentPositions(v) {
    if (v === 1) return [];
    var count = Math.floor(v / 7) + 2, size = 4 * v + 17;
    var step = Math.floor((v * 8 + count * 3 + 5) / (count * 4 - 4)) * 2, out = [6];
    for (var pos = size - 7; out.length < count; pos -= step) out.splice(1, 0, pos);
    return out;
  }

  // --- Reed-Solomon over GF(256), polynomial 0x11d ---------------------------------------
  function gfMul(a, b) {
    var z = 0;
    for (var i = 7; i >= 0; i--) {
      z = (z << 1) ^ ((z >>> 7) * 0x11d);
      z ^= ((b >>> i) & 1) * a;
    }
    return z;
  }

  function rsDivisor(degree) {
    var poly = new Array(degree).fill(0), r = 1;
    poly[degree - 1] = 1;
    for (var i = 0; i < degree; i++) {
      for (var j = 0; j < degree; j++) {
        poly[j] = gfMul(poly[j], r);
        if (j + 1 < degree) poly[j] ^= poly[j + 1];
      }
      r = gfMul(r, 0x02);
    }
    return poly;
  }

  function rsRemainder(data, divisor) {
    var out = new Array(divisor.length).fill(0);
    data.forEach(function (b) {
      var factor = b ^ out.shift();
      out.push(0);
      divisor.forEach(function (c, i) { out[i] ^= gfMul(c, factor); });
    });
    return out;
  }

  // --- the codewords: mode, count, data, terminator, padding, then blocks interleaved -----
  function codewords(bytes, v, ecl) {
    var bits = [];
    function put(value, n) { for (var i = n - 1; i >= 0; i--) bits.push((value >>> i) & 1); }
    var capacityBits = dataCodewords(v, ecl) * 8;
    put(4, 4);
    put(bytes.length, v < 10 ? 8 : 16);
    bytes.forEach(function (b) { put(b, 8); });
    put(0, Math.min(4, capacityBits - bits.length));
    put(0, (8 - bits.length % 8) % 8);
    for (var pad = 0xec; bits.length < capacityBits; pad ^= 0xec ^ 0x11) put(pad, 8);
    var data = [];
    for (var i = 0; i < bits.length; i += 8) {
      var byte = 0;
      for (var j = 0; j < 8; j++) byte = (byte << 1) | bits[i + j];
      data.push(byte);
    }
    var blocks = BLOCKS[ecl][v], eccLen = ECC_PER_BLOCK[ecl][v];
    var raw = Math.floor(rawModules(v) / 8), short = blocks - raw % blocks;
    var shortLen = Math.floor(raw / blocks), divisor = rsDivisor(eccLen), parts = [];
    for (i = 0, j = 0; i < blocks; i++) {
      var len = shortLen - eccLen + (i < short ? 0 : 1), block = data.slice(j, j + len);
      j += len;
      parts.push({ data: block, ecc: rsRemainder(block, divisor) });
    }
    var out = [];
    for (i = 0; i <= shortLen - eccLen; i++) {
      parts.forEach(function (p) { if (i < p.data.length) out.push(p.data[i]); });
    }
    for (i = 0; i < eccLen; i++) parts.forEach(function (p) { out.push(p.ecc[i]); });
    return out;
  }

  // --- the matrix -------------------------------------------------------------------------
  var MASKS = [
    function (x, y) { return (x + y) % 2 === 0; },
    function (x, y) { return y % 2 === 0; },
    function (x) { return x % 3 === 0; },
    function (x, y) { return (x + y) % 3 === 0; },
    function (x, y) { return (Math.floor(x / 3) + Math.floor(y / 2)) % 2 === 0; },
    function (x, y) { return x * y % 2 + x * y % 3 === 0; },
    function (x, y) { return (x * y % 2 + x * y % 3) % 2 === 0; },
    function (x, y) { return ((x + y) % 2 + x * y % 3) % 2 === 0; }
  ];

  function Matrix(v) {
    var size = 4 * v + 17;
    this.size = size;
    this.dark = [];
    this.fixed = [];
    for (var y = 0; y < size; y++) {
      this.dark.push(new Array(size).fill(false));
      this.fixed.push(new Array(size).fill(false));
    }
  }

  Matrix.prototype.set = function (x, y, dark) {
    this.dark[y][x] = dark;
    this.fixed[y][x] = true;
  };

  Matrix.prototype.functionPatterns = function (v) {
    var size = this.size, self = this, i;
    for (i = 0; i < size; i++) {  // timing patterns
      this.set(6, i, i % 2 === 0);
      this.set(i, 6, i % 2 === 0);
    }
    [[3, 3], [size - 4, 3], [3, size - 4]].forEach(function (c) {  // finders and separators
      for (var dy = -4; dy <= 4; dy++) {
        for (var dx = -4; dx <= 4; dx++) {
          var x = c[0] + dx, y = c[1] + dy, d = Math.max(Math.abs(dx), Math.abs(dy));
          if (x >= 0 && x < size && y >= 0 && y < size) self.set(x, y, d !== 2 && d !== 4);
        }
      }
    });
    var pos = alignmentPositions(v), last = pos.length - 1;
    pos.forEach(function (ax, i) {
      pos.forEach(function (ay, j) {
        if ((i === 0 && j === 0) || (i === 0 && j === last) || (i === last && j === 0)) return;
        for (var dy = -2; dy <= 2; dy++) {
          for (var dx = -2; dx <= 2; dx++) {
            self.set(ax + dx, ay + dy, Math.max(Math.abs(dx), Math.abs(dy)) !== 1);
          }
        }
      });
    });
    this.format("M", 0);  // reserves the format areas (drawn again once the mask is known)
    if (v >= 7) {
      var rem = v;
      for (i = 0; i < 12; i++) rem = (rem << 1) ^ ((rem >>> 11) * 0x1f25);
      var bits = (v << 12) | rem;
      for (i = 0; i < 18; i++) {
        var bit = ((bits >>> i) & 1) === 1, a = size - 11 + i % 3, b = Math.floor(i / 3);
        this.set(a, b, bit);
        this.set(b, a, bit);
      }
    }
  };

  Matrix.prototype.format = function (ecl, mask) {
    var data = (FORMAT_BITS[ecl] << 3) | mask, rem = data, size = this.size, i;
    for (i = 0; i < 10; i++) rem = (rem << 1) ^ ((rem >>> 9) * 0x537);
    var bits = ((data << 10) | rem) ^ 0x5412;
    function bit(i) { return ((bits >>> i) & 1) === 1; }
    for (i = 0; i <= 5; i++) this.set(8, i, bit(i));
    this.set(8, 7, bit(6));
    this.set(8, 8, bit(7));
    this.set(7, 8, bit(8));
    for (i = 9; i < 15; i++) this.set(14 - i, 8, bit(i));
    for (i = 0; i < 8; i++) this.set(size - 1 - i, 8, bit(i));
    for (i = 8; i < 15; i++) this.set(8, size - 15 + i, bit(i));
    this.set(8, size - 8, true);  // the dark module
  };

  Matrix.prototype.place = function (data) {
    var size = this.size, i = 0;
    for (var right = size - 1; right >= 1; right -= 2) {
      if (right === 6) right = 5;
      for (var vert = 0; vert < size; vert++) {
        for (var j = 0; j < 2; j++) {
          var x = right - j, up = ((right + 1) & 2) === 0, y = up ? size - 1 - vert : vert;
          if (!this.fixed[y][x] && i < data.length * 8) {
            this.dark[y][x] = ((data[i >>> 3] >>> (7 - (i & 7))) & 1) === 1;
            i++;
          }
        }
      }
    }
  };

  Matrix.prototype.applyMask = function (mask) {
    var f = MASKS[mask];
    for (var y = 0; y < this.size; y++) {
      for (var x = 0; x < this.size; x++) {
        if (!this.fixed[y][x] && f(x, y)) this.dark[y][x] = !this.dark[y][x];
      }
    }
  };

  // The standard penalty (runs, 2x2 blocks, finder-like patterns, dark proportion).
  Matrix.prototype.penalty = function () {
    var size = this.size, m = this.dark, score = 0, darkCount = 0, x, y;
    function line(get) {
      var s = 0, run = 0, prev = null, seq = [];
      for (var i = 0; i < size; i++) {
        var d = get(i);
        seq.push(d ? 1 : 0);
        if (d === prev) run++;
        else { if (run >= 5) s += run - 2; run = 1; prev = d; }
      }
      if (run >= 5) s += run - 2;
      var text = seq.join(""), light = function (a, b) {
        return !/1/.test(text.slice(Math.max(a, 0), Math.max(b, 0)));
      };
      for (var k = text.indexOf("1011101"); k >= 0; k = text.indexOf("1011101", k + 1)) {
        if (light(k - 4, k) || light(k + 7, k + 11)) s += 40;
      }
      return s;
    }
    for (y = 0; y < size; y++) {
      score += line(function (i) { return m[y][i]; });
      score += line(function (i) { return m[i][y]; });
    }
    for (y = 0; y < size; y++) {
      for (x = 0; x < size; x++) {
        if (m[y][x]) darkCount++;
        if (x > 0 && y > 0 && m[y][x] === m[y][x - 1] && m[y][x] === m[y - 1][x] &&
            m[y][x] === m[y - 1][x - 1]) score += 3;
      }
    }
    return score + 10 * Math.floor(Math.abs(darkCount * 100 / (size * size) - 50) / 5);
  };

  // bytes: a Uint8Array or an array of 0..255. options: ecl ("L", "M" (default), "Q", "H"),
  // version (1..40; default: the smallest that holds the data), mask (0..7; default: the
  // one with the lowest penalty).
  function qrEncode(bytes, options) {
    options = options || {};
    var ecl = options.ecl || "M", v = options.version, data = Array.prototype.slice.call(bytes);
    if (!ECC_PER_BLOCK[ecl]) throw new Error("error correction level: L, M, Q or H");
    if (v === undefined || v === null) {
      for (v = 1; v <= 40 && capacity(v, ecl) < data.length; v++);
    }
    if (!(v >= 1 && v <= 40) || capacity(v, ecl) < data.length) throw new Error("too much data");
    var words = codewords(data, v, ecl), best = null;
    var masks = options.mask === undefined || options.mask === null ? [0, 1, 2, 3, 4, 5, 6, 7]
      : [options.mask];
    masks.forEach(function (mask) {
      var s = new Matrix(v);
      s.functionPatterns(v);
      s.place(words);
      s.applyMask(mask);
      s.format(ecl, mask);
      var p = masks.length > 1 ? s.penalty() : 0;
      if (best === null || p < best.penalty) best = { penalty: p, mask: mask, symbol: s };
    });
    return { version: v, ecl: ecl, mask: best.mask, size: best.symbol.size,
             modules: best.symbol.dark };
  }

  // The symbol as an <svg> element (quiet zone of 4 modules), one path for the dark modules.
  function qrSvg(doc, qr, title) {
    var ns = "http://www.w3.org/2000/svg", n = qr.size + 8, d = [];
    var svg = doc.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + n + " " + n);
    svg.setAttribute("role", "img");
    svg.setAttribute("shape-rendering", "crispEdges");
    var t = doc.createElementNS(ns, "title");
    t.textContent = title;
    svg.appendChild(t);
    var bg = doc.createElementNS(ns, "rect");
    bg.setAttribute("width", String(n));
    bg.setAttribute("height", String(n));
    bg.setAttribute("fill", "#fff");
    svg.appendChild(bg);
    qr.modules.forEach(function (row, y) {
      row.forEach(function (dark, x) { if (dark) d.push("M" + (x + 4) + " " + (y + 4) + "h1v1h-1z"); });
    });
    var path = doc.createElementNS(ns, "path");
    path.setAttribute("d", d.join(""));
    path.setAttribute("fill", "#000");
    svg.appendChild(path);
    return svg;
  }

  at.qrEncode = qrEncode;
  at.qrSvg = qrSvg;
  at.qrCapacity = capacity;
})(window);
