"""Association hygiene: half-open and garbage connections cannot lock sites out.

The attackers are raw sockets (half an A-ASSOCIATE-RQ, garbage, silence, a request trickled one
byte a second), from several loopback addresses (Linux routes all of 127/8 to the loopback, so
127.0.0.2... are other "hosts"); the legitimate site is dcmtk's echoscu/storescu from 127.0.0.1.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pydicom
import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import Instance
from corelab.receiver import Receiver, ReceiverConfig
from corelab.receiver_config import HANDSHAKE_TIMEOUT_S
from corelab.register import add_site
from tests.receiver_helpers import echoscu, small_series, start_tls_node, storescu, wait_for

pytestmark = pytest.mark.dcmtk

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def assoc_rq(called: bytes = b"CORELAB", calling: bytes = b"SITE1") -> bytes:
    """A complete A-ASSOCIATE-RQ for Verification; the AE title fields exactly as given (padded
    with trailing spaces to 16 bytes), so leading spaces and odd bytes reach the node as sent."""
    body = (struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1")
            + _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_LE))
            + _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def connect(port: int, source: str = "127.0.0.1", timeout_s: float = 30) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the node's answer: 0x02 accept, 0x03 reject, 0x07 abort; (0, b'')
    when the node closed the connection without a PDU."""
    head = _recv_exact(sock, 6)
    if len(head) < 6:
        return 0, b""
    kind, _, length = struct.unpack(">BBI", head)
    return kind, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except (ConnectionResetError, BrokenPipeError):
            return out
        if not chunk:
            return out
        out += chunk
    return out


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the node has closed the connection (EOF or reset), without sending anything."""
    sock.settimeout(0.05)
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


def reject_reason(body: bytes) -> tuple[int, int, int]:
    return body[1], body[2], body[3]


def acceptor_threads(receiver: Receiver) -> int:
    return sum(1 for t in threading.enumerate() if "AcceptorThread" in t.name
               and getattr(t, "_server", None) is receiver.server and t.is_alive())


@pytest.fixture
def node(settings):
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=3600, max_associations=4,
                                                 max_associations_per_host=2, max_handshakes=12)).start()
    yield receiver
    receiver.stop()


class Attack:
    """Many hostile connections of four kinds, spread over ``hosts`` loopback addresses."""

    def __init__(self, port: int, hosts: list[str], per_host: int):
        self.socks: list[tuple[str, socket.socket]] = []
        self._stop = threading.Event()
        rq = assoc_rq()
        for i in range(per_host):
            for host in hosts:
                sock = connect(port, host)
                kind = ("half_rq", "garbage", "silent", "trickle")[i % 4]
                if kind == "half_rq":  # the header promises the whole request; half of it comes
                    sock.sendall(rq[: len(rq) // 2])
                elif kind == "garbage":  # an A-ASSOCIATE-RQ type byte with a nonsense length, then noise
                    sock.sendall(b"\x01\x00\x7f\xff\xff\xff" + b"\xde\xad\xbe\xef" * 64)
                self.socks.append((kind, sock))
        self.trickler = threading.Thread(target=self._trickle, daemon=True)
        self.trickler.start()

    def _trickle(self) -> None:  # one byte a second: every read is quick, the request never ends
        rq = assoc_rq()
        for n in range(len(rq)):
            if self._stop.wait(1.0):
                return
            for kind, sock in self.socks:
                if kind == "trickle":
                    try:
                        sock.send(rq[n:n + 1])
                    except OSError:
                        pass

    def all_closed_by_node(self) -> bool:
        return all(closed_by_peer(sock) for _, sock in self.socks)

    def close(self) -> None:
        self._stop.set()
        for _, sock in self.socks:
            sock.close()


def test_half_open_connections_holding_every_slot_do_not_lock_a_site_out(node, tmp_path):
    # 4 slots; 2 attacker hosts x 8 connections (their per-host handshake cap) plus 8 from the
    # site's own address: 24 hostile connections, 6 times the slots, twice the handshake cap.
    attack = Attack(node.port, ["127.0.0.2", "127.0.0.3", "127.0.0.1"], per_host=8)
    try:
        time.sleep(0.3)  # all of them accepted and waiting
        started = time.monotonic()
        result = echoscu(node.port, aet="SITE1")
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert elapsed < HANDSHAKE_TIMEOUT_S, f"echo took {elapsed:.1f} s"
        files = small_series(tmp_path / "s", 5)
        started = time.monotonic()
        storescu(node.port, files, aet="SITE1")
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S
        with session_scope(node.settings) as session:
            assert len(session.exec(select(Instance)).all()) == 5
        # Every hostile connection is closed by the node within the documented time-out (the
        # accept loop looks every 0.5 s), the trickler included, though each read is quick.
        wait_for(attack.all_closed_by_node, timeout_s=HANDSHAKE_TIMEOUT_S + 2.5, interval_s=0.2,
                 what="the node to close every hostile connection")
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 2.5
        # ... and nothing of them is left: no handshake entry, no association thread.
        wait_for(lambda: node.guard.counts()["handshaking"] == 0 and acceptor_threads(node) == 0,
                 timeout_s=3, what="handshakes and their threads to be gone")
    finally:
        attack.close()
    assert node.guard.counts() == {"handshaking": 0, "associations": 0, "per_host": {}}


def test_a_handshaking_connection_the_peer_closes_is_freed_at_once(node):
    # Repeated waves of half requests and garbage that the attacker closes itself: each wave's
    # threads must end within a second, not after pynetdicom's ACSE time-out (30 s by default).
    for wave in range(3):
        socks = [connect(node.port, f"127.0.0.{2 + wave}") for _ in range(6)]
        for i, sock in enumerate(socks):
            sock.sendall(assoc_rq()[:40] if i % 2 else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: acceptor_threads(node) >= 1, timeout_s=3, what="the connections to be accepted")
        for sock in socks:
            sock.close()
        started = time.monotonic()
        wait_for(lambda: acceptor_threads(node) == 0 and node.guard.counts()["handshaking"] == 0, timeout_s=3,
                 interval_s=0.05, what="threads of closed connections to end")
        assert time.monotonic() - started < 1.5
    assert echoscu(node.port, aet="SITE1").returncode == 0


def test_per_host_cap_and_slots_freed_when_the_socket_closes(node):
    # Two associations from 127.0.0.1 (its cap is 2): established with raw requests, held open.
    held = []
    for _ in range(2):
        sock = connect(node.port)
        sock.sendall(assoc_rq())
        assert answer(sock)[0] == 0x02
        held.append(sock)
    assert node.guard.counts()["per_host"] == {"127.0.0.1": 2}
    # A third from the same host: rejected-transient, local limit exceeded (dcmtk shows it).
    refused = echoscu(node.port, aet="SITE1")
    assert refused.returncode != 0
    assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    sock = connect(node.port)
    sock.sendall(assoc_rq())
    kind, body = answer(sock)
    assert kind == 0x03 and reject_reason(body) == (0x02, 0x03, 0x02)
    sock.close()
    # Another host still gets in (the total is 4).
    other = connect(node.port, "127.0.0.9")
    other.sendall(assoc_rq())
    assert answer(other)[0] == 0x02
    # The site's socket dies without A-RELEASE or A-ABORT: its slot is free at once.
    held.pop().close()
    wait_for(lambda: node.guard.counts()["per_host"].get("127.0.0.1") == 1, timeout_s=2, interval_s=0.05,
             what="the slot of the closed socket to be freed")
    assert echoscu(node.port, aet="SITE1").returncode == 0
    # Total cap: 127.0.0.1 holds 1, 127.0.0.9 holds 1; two more hosts fill the 4 slots.
    for host in ("127.0.0.10", "127.0.0.11"):
        s = connect(node.port, host)
        s.sendall(assoc_rq())
        assert answer(s)[0] == 0x02
        held.append(s)
    s = connect(node.port, "127.0.0.12")
    s.sendall(assoc_rq())
    kind, body = answer(s)
    assert kind == 0x03 and reject_reason(body) == (0x02, 0x03, 0x02)
    for s in [*held, other]:
        s.close()
    wait_for(lambda: node.guard.counts()["associations"] == 0, timeout_s=2, what="every slot to be freed")


def test_a_huge_pdu_before_association_is_not_buffered(node):
    sock = connect(node.port, "127.0.0.7")
    sock.sendall(b"\x01\x00\x7f\xff\xff\xff")  # an A-ASSOCIATE-RQ of 2 GiB, says the header
    started = time.monotonic()
    try:
        for _ in range(64):  # the node stops reading: sending more fails or the peer is gone
            sock.sendall(b"\0" * 65536)
    except OSError:
        pass
    wait_for(lambda: closed_by_peer(sock), timeout_s=2, interval_s=0.05, what="the node to close the connection")
    assert time.monotonic() - started < 2
    sock.close()
    assert echoscu(node.port, aet="SITE1").returncode == 0


@pytest.mark.parametrize("called, calling, expected", [
    (b"CORELAB", b"SITE1", None),                        # the control: accepted
    (b"OTHERNODE", b"SITE1", (0x01, 0x01, 0x07)),        # wrong called AE title
    (b" CORELAB", b"SITE1", (0x01, 0x01, 0x07)),         # called AE title with a leading space
    (b"CORELAB", b" SITE1", (0x01, 0x01, 0x03)),         # calling AE title with a leading space
    (b"CORELAB", b"  SITE1", (0x01, 0x01, 0x03)),
    (b"CORELAB", b"NOSUCHSITE", (0x01, 0x01, 0x03)),     # well-formed, not registered
])
def test_ae_titles_are_checked_as_sent(node, called, calling, expected):
    sock = connect(node.port)
    sock.sendall(assoc_rq(called=called, calling=calling))
    kind, body = answer(sock)
    sock.close()
    if expected is None:
        assert kind == 0x02
    else:
        assert kind == 0x03 and reject_reason(body) == expected


@pytest.mark.parametrize("calling", [b"SI\\TE1", b"SITE\x011", b"SIT\xc9", b"\x00" * 16])
def test_calling_ae_titles_with_forbidden_bytes_are_refused(node, calling):
    sock = connect(node.port)
    sock.sendall(assoc_rq(calling=calling))
    kind, _ = answer(sock)
    sock.close()
    assert kind in (0x03, 0x07, 0)  # rejected or aborted, never accepted
    assert echoscu(node.port, aet="SITE1").returncode == 0


def test_wrong_called_ae_title_with_dcmtk(node):
    refused = echoscu(node.port, aet="SITE1", aec="NOTCORELAB")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu(node.port, aet="SITE1", aec="CORELAB").returncode == 0


def test_silent_connections_cannot_stall_a_tls_node(settings, tmp_path):
    """pynetdicom does the TLS handshake in its accept loop, where one silent client stops every
    other connection; ours does it in the connection's thread, within the handshake time-out."""
    receiver, cert = start_tls_node(settings, tmp_path)
    silent = []
    try:
        silent = [connect(receiver.port, f"127.0.0.{2 + i % 3}") for i in range(6)]
        half_hello = connect(receiver.port, "127.0.0.5")
        half_hello.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
        silent.append(half_hello)
        time.sleep(0.3)
        files = small_series(tmp_path / "s", 2)
        started = time.monotonic()
        storescu(receiver.port, files, aet="SITE1", extra=("+tla", "+cf", str(cert)), timeout_s=60)
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S
        wait_for(lambda: all(closed_by_peer(s) for s in silent), timeout_s=HANDSHAKE_TIMEOUT_S + 2.5,
                 interval_s=0.2, what="the silent TLS connections to be closed")
    finally:
        for s in silent:
            s.close()
        receiver.stop()
    with session_scope(settings) as session:
        assert {r.sop_instance_uid for r in session.exec(select(Instance))} == \
            {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}


# --- the rules at registration, and the paths built from site codes ----------------------------------

@pytest.mark.parametrize("code", ["../../X", "..", ".", "a/b", "A01/..", "", "_trial", "-A", "a01", "A 01",
                                  "A" * 33, "A01\x00", "A01\\B"])
def test_unsafe_site_codes_are_refused_at_registration(settings, code):
    from corelab.register import RegisterError

    with session_scope(settings) as session:
        with pytest.raises(RegisterError, match="site code .* is refused: a site code must be 1-32 characters"):
            add_site(session, code=code, ae_title="SITE9")


@pytest.mark.parametrize("ae_title", [" SITE1", "SITE1 ", "SI\\TE1", "SITE\x011", "SITÉ", "A" * 17, "", "   "])
def test_malformed_ae_titles_are_refused_at_registration(settings, ae_title):
    from corelab.register import RegisterError

    with session_scope(settings) as session:
        with pytest.raises(RegisterError, match="not a valid DICOM AE title"):
            add_site(session, code="S9", ae_title=ae_title)


def test_valid_codes_and_titles_are_registered(settings):
    with session_scope(settings) as session:
        for code, ae_title in [("A01", "SITE_A01"), ("B-2_X", "SITE B"), ("9" * 32, "A" * 16), ("Z", "x!#~")]:
            assert add_site(session, code=code, ae_title=ae_title).code == code


def test_register_yaml_with_a_path_as_site_or_trial_code_is_refused(settings, tmp_path):
    from corelab.register import RegisterError, load_register

    bad_site = tmp_path / "site.yaml"
    bad_site.write_text("sites: [{code: ../../X, ae_title: EVIL}]\n")
    bad_trial = tmp_path / "trial.yaml"
    bad_trial.write_text("trial_code: ../manuals/x\nsites: []\n")
    looked_up = []
    with session_scope(settings) as session:
        with pytest.raises(RegisterError, match="'../../X' is refused"):
            load_register(session, bad_site)
        with pytest.raises(RegisterError, match="trial code '../manuals/x' is refused"):
            load_register(session, bad_trial, trial_fields=lambda code: looked_up.append(code) or {})
    assert looked_up == []  # refused before the manual was looked up by it


def test_report_and_outbox_paths_from_an_unsafe_stored_code_are_refused(settings, tmp_path):
    """A code that reached the store before validation (or by an edit) never becomes a path
    outside the data directory."""
    from corelab.models import Report, Site
    from reports.delivery import outbox_for
    from reports.render import ReportError, ReportSpec, render_report, report_files

    with session_scope(settings) as session:
        site = Site(code="../../X", ae_title="EVIL")
        session.add(site)
        session.flush()
        report = Report(kind="site_qc", site_id=site.id, path="reports/site_qc/x/x-v1.html", sha256="0" * 64,
                        version=1)
        session.add(report)
        session.flush()
        with pytest.raises(ReportError, match="unsafe report path"):
            outbox_for(session, settings, report)
        spec = ReportSpec(kind="site_qc", key="../../X_2024-01", title="t", template="site_qc.html.j2", data={})
        with pytest.raises(ReportError, match="unsafe report path"):
            render_report(session, spec, data_dir=settings.data_dir, reports_dir=settings.reports_dir)
        for path in ("../../../etc/passwd.html", "/etc/passwd.html", "reports/../../x.html"):
            report.path = path
            with pytest.raises(ReportError):
                report_files(settings.data_dir, report)
        session.rollback()
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(settings.data_dir)]
    assert outside == []  # nothing was made outside the data directory
