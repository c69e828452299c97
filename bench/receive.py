"""Throughput of the DICOM node against dcmtk's storescp, measured in the same run.

2,000 synthetic PET slices (128 x 128, 16 bit, ~34 KB each) are sent by dcmtk ``storescu`` over
loopback in one association, once to dcmtk ``storescp`` and once to corelab's receiver (in this
process, the same code ``corelab receive`` runs). TCP_NODELAY is on for every side: dcmtk reads
``TCP_NODELAY=1`` from its environment, corelab sets it on each accepted socket; without it both
would measure the ~40 ms delayed-ACK timer rather than themselves.

What is compared: storescp writes each file and answers (no fsync, no index). corelab answers
only after the temporary file was fsynced and renamed, the directory fsynced, the object parsed,
checked (de-identification, SOP class, truncation) and its row with the sha256 committed.
Target: corelab at 0.5x storescp's throughput or better. Two more references, measured in the
same run, show where that target sits on this machine: pynetdicom itself with a handler that
does nothing (the library polls its sockets with 1 ms sleeps, so one association cannot go faster
than that), and the durable write alone (what "never lose an acknowledged instance" costs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from synth.net import free_port, wait_port
from synth.small_series import write_pet_slices

N_SLICES = 2000
MATRIX = 128
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"




def _send(folder: Path, port: int, *, aet: str, aec: str) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    proc = subprocess.run([STORESCU, "-aet", aet, "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def bench_storescp(folder: Path, work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "--output-directory", str(out), str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        elapsed = _send(folder, port, aet="BENCH", aec="STORESCP")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    received = sum(1 for _ in out.iterdir())
    if received != N_SLICES:
        raise RuntimeError(f"storescp wrote {received} of {N_SLICES} files")
    return elapsed


def bench_corelab(folder: Path, work: Path) -> float:
    os.environ["CORELAB_DATA_DIR"] = str(work / "data")
    from sqlmodel import select

    from corelab.db import session_scope
    from corelab.models import Instance
    from corelab.receiver import Receiver, ReceiverConfig
    from corelab.register import add_site
    from corelab.settings import load_settings

    settings = load_settings()
    with session_scope(settings) as session:
        add_site(session, code="BENCH", ae_title="BENCH")
    # Completion is not part of the figure: the series stays "receiving" during the run.
    receiver = Receiver(settings, ReceiverConfig(ae_title="CORELAB", port=0, bind_address="127.0.0.1",
                                                 stable_s=3600)).start()
    try:
        elapsed = _send(folder, receiver.port, aet="BENCH", aec="CORELAB")
    finally:
        receiver.stop()
    with session_scope(settings) as session:
        stored = len(session.exec(select(Instance.id)).all())
    if stored != N_SLICES:
        raise RuntimeError(f"corelab indexed {stored} of {N_SLICES} instances")
    return elapsed


def bench_pynetdicom_noop(folder: Path) -> float:
    """The library's own ceiling: pynetdicom with a C-STORE handler that only takes the bytes."""
    from pynetdicom import AE, evt

    from corelab.dicom_handlers import handle_open
    from corelab.ingest import SOP_CLASSES
    from corelab.receiver_config import TRANSFER_SYNTAXES

    ae = AE("NOOP")
    for sop_class in SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.maximum_pdu_size = 0
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, handle_open),
                                           (evt.EVT_C_STORE, lambda event: (event.encoded_dataset(), 0)[1])])
    try:
        return _send(folder, server.server_address[1], aet="BENCH", aec="NOOP")
    finally:
        server.shutdown()


def bench_durable_floor(files: list[Path], work: Path) -> float:
    """The durability floor: write + fsync + rename + directory fsync of the same files, no network."""
    from corelab.ingest import durable_write

    out = work / "durable-floor"
    data = [p.read_bytes() for p in files]
    start = time.perf_counter()
    for i, blob in enumerate(data):
        durable_write(out / f"{i}.dcm", blob)
    return time.perf_counter() - start


def main() -> None:
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for tool in (STORESCU, STORESCP):
        if not Path(tool).is_file():
            raise SystemExit(f"{tool} is missing: install dcmtk (make system-deps)")
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-receive-"))
    try:
        files = write_pet_slices(work / "pet", N_SLICES, MATRIX)
        size_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        t_ref = bench_storescp(work / "pet", work)
        t_noop = bench_pynetdicom_noop(work / "pet")
        t_floor = bench_durable_floor(files, work)
        t_corelab = bench_corelab(work / "pet", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref_rate, rate = N_SLICES / t_ref, N_SLICES / t_corelab
    print(f"{N_SLICES} PET slices of {size_kb:.0f} KB, dcmtk storescu over loopback, TCP_NODELAY on every side")
    print(f"{'receiver':26} {'seconds':>8} {'images/s':>9} {'vs storescp':>12}")
    for name, t in (("dcmtk storescp (no fsync)", t_ref), ("pynetdicom, no-op handler", t_noop),
                    ("durable write only", t_floor), ("corelab receive", t_corelab)):
        print(f"{name:26} {t:8.2f} {N_SLICES / t:9.0f} {t_ref / t:12.2f}")
    print(f"ratio corelab/storescp throughput: {rate / ref_rate:.2f} (target >= 0.5); "
          f"corelab/pynetdicom no-op: {t_noop / t_corelab:.2f}")


if __name__ == "__main__":
    main()
