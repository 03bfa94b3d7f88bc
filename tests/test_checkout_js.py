"""The checkout page's own JavaScript, run in headless Chromium: the integrated-address
builder (Keccak-256, Monero base58) held to the `monero` package and to our own
`anon_ticket.domain.address`, and the QR encoder held to segno's matrices for the same data,
version, error level and mask (README, "Checkout page").

The scripts are the files the public listener serves (anon_ticket/checkout/), loaded into a
blank page; tests/test_checkout_page.py runs them as served, under the page's CSP.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import segno
from monero import base58
from monero.address import Address
from monero.keccak import keccak_256
from monero.seed import Seed
from selenium.webdriver.chrome.webdriver import WebDriver

from anon_ticket.domain.address import integrated_address
from anon_ticket.domain.ids import PaymentId
from tests.browser import chromium

SCRIPTS = ("address.js", "qr.js")


def script(name: str) -> str:
    return resources.files("anon_ticket").joinpath("checkout", name).read_text()


@pytest.fixture(scope="module")
def js() -> Iterator[WebDriver]:
    with chromium() as driver:
        driver.get("about:blank")
        for name in SCRIPTS:
            driver.execute_script(script(name))
        yield driver


def call(driver: WebDriver, body: str, *args: Any) -> Any:
    return driver.execute_script("var at = window.AnonTicket;\n" + body, *args)


def raw_address(netbyte: int, payload: bytes) -> str:
    raw = bytes([netbyte]) + payload
    return str(base58.encode((raw + keccak_256(raw).digest()[:4]).hex()))


def pids(rng: random.Random, n: int) -> list[bytes]:
    fixed = [bytes(7) + b"\x01", b"\xff" * 8, bytes.fromhex("0123456789abcdef")]
    return fixed + [rng.randbytes(8) for _ in range(n)]


# --- Keccak-256 and base58 ----------------------------------------------------------------


def test_keccak256_matches_the_monero_package(js: WebDriver) -> None:
    rng = random.Random(1)
    # around the 136-byte rate: one block, exactly one, two
    inputs = [b"", b"a", *(rng.randbytes(n) for n in (1, 65, 73, 135, 136, 137, 271, 272, 500))]
    got = call(js, "return arguments[0].map(function (h) {"
                   " return at.toHex(at.keccak256(at.fromHex(h))); });",
               [i.hex() for i in inputs])
    assert got == [keccak_256(i).hexdigest() for i in inputs]
    assert got[0] == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


def test_base58_round_trips_like_the_monero_package(js: WebDriver) -> None:
    rng = random.Random(2)
    blobs = [rng.randbytes(n) for n in (1, 2, 5, 7, 8, 9, 16, 69, 77)] + [b"\x00" * 9]
    encoded = call(js, "return arguments[0].map(function (h) {"
                       " return at.base58Encode(at.fromHex(h)); });",
                   [b.hex() for b in blobs])
    assert encoded == [base58.encode(b.hex()) for b in blobs]
    decoded = call(js, "return arguments[0].map(function (s) {"
                       " return at.toHex(at.base58Decode(s)); });", encoded)
    assert decoded == [b.hex() for b in blobs]


# --- integrated addresses -----------------------------------------------------------------


@pytest.mark.parametrize("net", ["main", "test", "stage"])
def test_integrated_addresses_match_the_monero_package(js: WebDriver, net: str) -> None:
    rng = random.Random(net)
    cases = []
    for _ in range(4):
        primary = Seed(rng.randbytes(32).hex()).public_address(net)
        for pid in pids(rng, 3):
            expected = str(Address(primary).with_payment_id(pid.hex()))
            cases.append((str(primary), pid.hex(), expected))
    got = call(js, "return arguments[0].map(function (c) {"
                   " return [at.integratedAddress(c[0], at.fromHex(c[1])),"
                   "         at.parsePrimary(c[0]).network]; });", cases)
    network = {"main": "mainnet", "test": "testnet", "stage": "stagenet"}[net]
    assert [g[0] for g in got] == [c[2] for c in cases]
    assert {g[1] for g in got} == {network}
    if net == "main":  # the address the CLI (`anon-ticket pid new`) builds, and the dev chain's
        for primary, pid, _ in cases:
            assert integrated_address(primary, PaymentId(bytes.fromhex(pid))) in [
                g[0] for g in got]


def test_random_keys_too(js: WebDriver) -> None:
    # Keys need not be curve points to be encoded: random 64 bytes under each network byte.
    rng = random.Random(3)
    cases = []
    for netbyte in (18, 53, 24):
        for _ in range(5):
            primary = raw_address(netbyte, rng.randbytes(64))
            pid = rng.randbytes(8)
            cases.append((primary, pid.hex(),
                          str(Address(primary).with_payment_id(pid.hex()))))
    got = call(js, "return arguments[0].map(function (c) {"
                   " return at.integratedAddress(c[0], at.fromHex(c[1])); });", cases)
    assert got == [c[2] for c in cases]


def test_what_is_not_a_primary_address_is_refused(js: WebDriver) -> None:
    rng = random.Random(4)
    primary = str(Seed(rng.randbytes(32).hex()).public_address())
    integrated = str(Address(primary).with_payment_id("0123456789abcdef"))
    flipped = primary[:50] + ("2" if primary[50] != "2" else "3") + primary[51:]
    bad = {
        "subaddress": raw_address(42, rng.randbytes(64)),
        "integrated": integrated,
        "checksum": flipped,
        "length": primary[:-1],
        "alphabet": primary[:-1] + "0",
        "netbyte": raw_address(99, rng.randbytes(64)),
    }
    got = call(js, "var bad = arguments[0], out = {}; Object.keys(bad).forEach(function (k) {"
                   " try { at.integratedAddress(bad[k], new Uint8Array(8)); out[k] = null; }"
                   " catch (e) { out[k] = e.message; } }); return out;", bad)
    assert got["subaddress"] == "not a primary address: a subaddress"
    assert got["integrated"] == "not a primary address (95 characters)"
    assert got["checksum"] == "not a Monero address (bad checksum)"
    assert got["length"] == "not a primary address (95 characters)"
    assert got["alphabet"] in ("bad base58 character", "bad base58 block")
    assert got["netbyte"] == "not a primary address: unknown network"
    short = call(js, "try { at.integratedAddress(arguments[0], new Uint8Array(7)); }"
                     " catch (e) { return e.message; }", primary)
    assert short == "payment id: 8 bytes"


def test_payment_ids_are_random_eight_bytes_never_zero(js: WebDriver) -> None:
    drawn = call(js, "var out = []; for (var i = 0; i < 200; i++)"
                     " out.push(at.toHex(at.newPaymentId())); return out;")
    assert len(set(drawn)) == 200
    for pid in drawn:
        PaymentId.parse(pid)  # 16 hex, not all zero
    checks = call(js, "return ['0123456789abcdef', '0000000000000000', '0123456789ABCDEF',"
                      " '0123', 'zz23456789abcdef'].map(at.isPaymentId);")
    assert checks == [True, False, False, False, False]


def test_amounts(js: WebDriver) -> None:
    got = call(js, "return [at.formatXmr(10000000000), at.formatXmr(1500000000000),"
                   " at.formatXmr('18446744073709551615'), at.formatXmr(0),"
                   " String(at.parseXmr('1.5')),"
                   " String(at.parseXmr('0.000000000001')), at.parseXmr('1.0000000000001'),"
                   " at.parseXmr('-1'), at.parseXmr('1e3'), String(at.parseXmr(' 2 '))];")
    assert got == ["0.01", "1.5", "18446744.073709551615", "0", "1500000000000", "1",
                   None, None, None, "2000000000000"]


# --- the QR encoder -----------------------------------------------------------------------
#
# segno 1.6.6 pads a data stream that already ends on a codeword boundary with 8 more zero
# bits (`8 - length % 8`), so every byte-mode symbol it makes that is not full carries a 0x00
# codeword before the pad codewords. The QR standard pads with zero bits only up to the
# boundary, then with pad codewords (as segno's own docstring of that step says); the page's
# encoder does that. Where the symbol is full the two cannot differ and segno is used as it
# is; elsewhere, with its padding set to the boundary.


def _padding_to_the_boundary(buff: Any, version: int, length: int) -> None:
    buff.extend([0] * ((8 - length % 8) % 8))


@pytest.fixture
def standard_segno(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segno.encoder, "write_padding_bits", _padding_to_the_boundary)


def test_segno_pads_with_a_zero_codeword_and_that_is_all(js: WebDriver,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    data = b"monero:x"
    as_is = segno_matrix(data, 1, "M", 2)
    monkeypatch.setattr(segno.encoder, "write_padding_bits", _padding_to_the_boundary)
    assert segno_matrix(data, 1, "M", 2) != as_is  # the quirk is there (else drop the patch)
    (version, mask, matrix), = encode_all(js, [{"data": data.hex(), "ecl": "M", "version": 1,
                                                "mask": 2}])
    assert (version, mask) == (1, 2)
    assert matrix == segno_matrix(data, 1, "M", 2)

BITS = bytes.maketrans(b"\x00\x01", b"01")
QR_MATRIX = ("var q = at.qrEncode(at.fromHex(c.data), {ecl: c.ecl, version: c.version,"
             " mask: c.mask});"
             " return [q.version, q.mask, q.modules.map(function (row) {"
             "   return row.map(function (d) { return d ? '1' : '0'; }).join(''); }).join('\\n')];")


def segno_matrix(data: bytes, version: int, ecl: str, mask: int) -> str:
    qr = segno.make(data, version=version, error=ecl.lower(), mask=mask, mode="byte",
                    boost_error=False, micro=False)
    assert (qr.version, qr.error, qr.mask) == (version, ecl, mask)
    return "\n".join(bytes(row).translate(BITS).decode() for row in qr.matrix)


def capacities(js: WebDriver) -> dict[tuple[int, str], int]:
    got = call(js, "var out = []; for (var v = 1; v <= 40; v++) 'LMQH'.split('').forEach("
                   "function (e) { out.push([v, e, at.qrCapacity(v, e)]); }); return out;")
    return {(v, e): n for v, e, n in got}


def encode_all(js: WebDriver, cases: list[dict[str, Any]]) -> list[list[Any]]:
    got: list[list[Any]] = call(js, "return arguments[0].map(function (c) {" + QR_MATRIX + "});",
                                cases)
    return got


def test_qr_matrices_match_segno_for_every_version_and_level(js: WebDriver) -> None:
    """Every version and level, each full (so every block layout and its interleaving is
    used), masks taken in turn; segno as it is."""
    rng = random.Random(5)
    cases, full = [], capacities(js)
    for version in range(1, 41):
        for i, ecl in enumerate("LMQH"):
            capacity = full[version, ecl]
            cases.append({"data": rng.randbytes(capacity).hex(), "ecl": ecl,
                          "version": version, "mask": (version + i) % 8})
    got = encode_all(js, cases)
    for case, (version, mask, matrix) in zip(cases, got, strict=True):
        assert (version, mask) == (case["version"], case["mask"])
        expected = segno_matrix(bytes.fromhex(case["data"]), version, case["ecl"], mask)
        assert matrix == expected, (version, case["ecl"], mask)


@pytest.mark.usefixtures("standard_segno")
def test_qr_matrices_match_segno_with_room_to_pad(js: WebDriver) -> None:
    """Every version again (the levels in turn), short of full by 1 to 40 bytes: pad
    codewords."""
    rng = random.Random(8)
    cases, full = [], capacities(js)
    for version in range(1, 41):
        ecl = "LMQH"[version % 4]
        size = max(0, full[version, ecl] - rng.randrange(1, 41))
        cases.append({"data": rng.randbytes(size).hex(), "ecl": ecl, "version": version,
                      "mask": (version + 3) % 8})
    got = encode_all(js, cases)
    for case, (version, mask, matrix) in zip(cases, got, strict=True):
        expected = segno_matrix(bytes.fromhex(case["data"]), version, case["ecl"], mask)
        assert matrix == expected, (version, case["ecl"], mask)


def test_the_capacity_is_segnos(js: WebDriver) -> None:
    # One byte more than the JS says fits makes segno move to the next version.
    for version, ecl in ((1, "L"), (7, "M"), (10, "Q"), (27, "H"), (40, "M")):
        capacity = call(js, "return at.qrCapacity(arguments[0], arguments[1]);", version, ecl)
        segno.make(b"x" * capacity, version=version, error=ecl, mode="byte", boost_error=False)
        with pytest.raises(segno.DataOverflowError):
            segno.make(b"x" * (capacity + 1), version=version, error=ecl, mode="byte",
                       boost_error=False)


@pytest.mark.usefixtures("standard_segno")
def test_every_mask_of_a_payment_uri_matches_segno(js: WebDriver) -> None:
    rng = random.Random(6)
    primary = str(Seed(rng.randbytes(32).hex()).public_address())
    address = str(Address(primary).with_payment_id(rng.randbytes(8).hex()))
    uri = f"monero:{address}?tx_amount=0.01".encode()
    cases = [{"data": uri.hex(), "ecl": "M", "version": None, "mask": mask} for mask in range(8)]
    got = encode_all(js, cases)
    auto = segno.make(uri, error="m", mode="byte", boost_error=False, micro=False)
    for mask, (version, got_mask, matrix) in enumerate(got):
        assert (version, got_mask) == (auto.version, mask)  # the smallest version that holds it
        assert matrix == segno_matrix(uri, version, "M", mask)


@pytest.mark.usefixtures("standard_segno")
def test_the_chosen_mask_is_one_of_segnos_matrices(js: WebDriver) -> None:
    """Without a mask the encoder picks the one with the lowest penalty; whichever it picks,
    the symbol is segno's for that mask."""
    rng = random.Random(7)
    cases = []
    for n in (1, 17, 106, 140, 300):
        cases.append({"data": rng.randbytes(n).hex(),
                      "ecl": "M", "version": None, "mask": None})
    got = encode_all(js, cases)
    masks = set()
    for case, (version, mask, matrix) in zip(cases, got, strict=True):
        data = bytes.fromhex(case["data"])
        assert version == segno.make(data, error="m", mode="byte", boost_error=False,
                                     micro=False).version
        assert matrix == segno_matrix(data, version, "M", mask)
        masks.add(mask)
    assert len(masks) > 1  # the penalty does choose


def test_the_svg_has_one_square_per_dark_module(js: WebDriver) -> None:
    got = call(js, "var q = at.qrEncode(new TextEncoder().encode('monero:x'));"
                   " var svg = at.qrSvg(document, q, 'monero:x');"
                   " var dark = 0; q.modules.forEach(function (r) { r.forEach(function (d) {"
                   "   if (d) dark++; }); });"
                   " return [svg.getAttribute('viewBox'), dark,"
                   "   (svg.querySelector('path').getAttribute('d').match(/M/g) || []).length,"
                   "   svg.querySelector('title').textContent];")
    assert got[0] == "0 0 29 29"  # version 1 (21 modules) and a quiet zone of 4
    assert got[1] == got[2] > 0
    assert got[3] == "monero:x"
