"""STOW-RS throughput of corelab's portal against its own C-STORE path and Orthanc's STOW-RS, in one run.

2,000 synthetic PET slices (200 x 200, 16 bit, ~80 KB each) are read into memory once, then sent:

1. by ``dicomweb-client`` (``store_instances``, 100 instances per request, as a site's script
   would send a series) to corelab's ``POST /dicomweb/studies``, the portal served by uvicorn in its
   own process with an API token;
2. by dcmtk ``storescu`` in one association to corelab's DICOM node (``bench.receive.bench_corelab``,
   the path ``corelab receive`` runs);
3. by the same ``dicomweb-client`` code to Orthanc's DICOMweb plugin (``/dicom-web/studies``),
   Debian's Orthanc started on loopback by :class:`synth.orthanc.Orthanc`.

Every side is checked afterwards: 2,000 instances indexed. What differs: corelab answers a STOW
only after each object was parsed, checked (de-identification, SOP class, ownership), written
with fsync and rename and its row committed; Orthanc writes without fsync.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from synth.net import free_port, wait_port
from synth.small_series import write_pet_slices

N_SLICES = 2000
MATRIX = 200
BATCH = 100
SERVER = "from corelab.settings import load_settings\nfrom portal.serve import portal_server\n" \
         "portal_server(load_settings()).run()\n"


def _send(client, datasets) -> float:
    start = time.perf_counter()
    for i in range(0, len(datasets), BATCH):
        answer = client.store_instances(datasets[i:i + BATCH])
        if answer.get("FailedSOPSequence"):  # Orthanc sends it empty when nothing failed
            raise RuntimeError(f"{len(answer.FailedSOPSequence)} instances failed in batch {i // BATCH + 1}")
    return time.perf_counter() - start


def bench_corelab_stow(datasets, work: Path) -> float:
    """corelab's portal in a subprocess, one site user with an API token, dicomweb-client."""
    from dicomweb_client.api import DICOMwebClient
    from sqlmodel import func, select

    from corelab.db import session_scope
    from corelab.models import Instance
    from corelab.register import add_site
    from corelab.settings import load_settings
    from services import accounts

    port = free_port()
    env = dict(os.environ, CORELAB_DATA_DIR=str(work / "stow-data"), CORELAB_PORTAL_PORT=str(port))
    settings = load_settings(env)
    settings.ensure_dirs()
    with session_scope(settings) as s:
        add_site(s, code="BENCH", ae_title="BENCH")
        accounts.add_user(s, "bench-site", role="site", sites=["BENCH"], password="bench password 2000",
                          actor="bench")
        token = accounts.create_token(s, "bench-site", actor="bench")["token"]
    with open(work / "portal.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(port, 60)
            client = DICOMwebClient(url=f"http://127.0.0.1:{port}/dicomweb",
                                    headers={"Authorization": f"Bearer {token}"})
            elapsed = _send(client, datasets)
        finally:
            server.terminate()
            server.wait(30)
    with session_scope(settings) as s:
        stored = s.exec(select(func.count()).select_from(Instance)).one()
    if stored != N_SLICES:
        raise RuntimeError(f"corelab STOW-RS indexed {stored} of {N_SLICES} instances")
    return elapsed


def bench_orthanc_stow(datasets, work: Path) -> float:
    from dicomweb_client.api import DICOMwebClient

    from synth.orthanc import Orthanc

    with Orthanc(work / "orthanc") as pacs:
        client = DICOMwebClient(url=pacs.dicomweb_url, session=pacs.session())
        elapsed = _send(client, datasets)
        stored = len(pacs.instances())
    if stored != N_SLICES:
        raise RuntimeError(f"Orthanc holds {stored} of {N_SLICES} instances")
    return elapsed


def main() -> None:
    import logging

    from bench.receive import STORESCU, bench_corelab

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if not Path(STORESCU).is_file():
        raise SystemExit(f"{STORESCU} is missing: install dcmtk (make system-deps)")
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-stow-"))
    try:
        files = write_pet_slices(work / "pet", N_SLICES, MATRIX)
        size_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        datasets = [pydicom.dcmread(p) for p in files]  # read once: the client's disk is not measured
        t_stow = bench_corelab_stow(datasets, work)
        t_cstore = bench_corelab(work / "pet", work)
        t_orthanc = bench_orthanc_stow(datasets, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{N_SLICES} PET slices of {MATRIX} x {MATRIX} ({size_kb:.0f} KB), loopback; STOW-RS by dicomweb-client "
          f"in requests of {BATCH}, C-STORE by dcmtk storescu in one association")
    print(f"{'path':34} {'seconds':>8} {'inst/s':>8} {'vs Orthanc STOW':>16}")
    for name, t in (("Orthanc STOW-RS (no fsync)", t_orthanc), ("corelab STOW-RS (portal)", t_stow),
                    ("corelab C-STORE (DICOM node)", t_cstore)):
        print(f"{name:34} {t:8.2f} {N_SLICES / t:8.0f} {t_orthanc / t:16.2f}")
    print(f"ratio corelab STOW-RS / corelab C-STORE throughput: {t_cstore / t_stow:.2f}; "
          f"corelab STOW-RS / Orthanc STOW-RS: {t_orthanc / t_stow:.2f}")


if __name__ == "__main__":
    main()
