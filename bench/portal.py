"""Portal benchmark (issue: the core lab portal).

A store of 50 sites and 10,000 series (2,500 subjects x 2 visits x PET + CT; deviations on about
a third of the PET series, queries on some, quarantined objects, reports) is served by the real
portal (uvicorn on loopback, a real HTTP client, logged in through the login form). For each of
the pages the issue names (a site's grid, the deviation table, the physicist's worklist) it
measures p50 and p95 page time over repeated requests, next to the same server sending a static
file of the same size in the same run. Target: p95 under 200 ms.

    python -m bench portal            (make bench runs it with the others)
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

N_SITES, N_SUBJECTS_PER_SITE, REQUESTS, TARGET_MS = 50, 50, 60, 200.0
PASSWORD = "bench password 1234"


def populate(settings) -> dict:
    """Fill an empty store: returns the codes the pages are asked for."""
    from corelab.db import session_scope
    from corelab.models import (Deviation, QuarantineItem, Query, Report, Scanner, Series, Site, Study, Subject,
                                Trial, Visit, utcnow)
    from services import accounts

    rng = random.Random(13)
    now = utcnow()
    with session_scope(settings) as s:
        trial = Trial(code="BENCH-01", title="portal benchmark", standard="EARL1")
        s.add(trial)
        s.flush()
        sites = [Site(code=f"S{i:02d}", name=f"Site {i:02d}", ae_title=f"S{i:02d}_PET") for i in range(N_SITES)]
        s.add_all(sites)
        s.flush()
        scanners = [Scanner(site_id=site.id, code=f"{site.code}-1", manufacturer="Vendor", model="PET/CT",
                            serial_number=f"SN{site.id:04d}") for site in sites]
        s.add_all(scanners)
        s.flush()
        n_series = 0
        for site, scanner in zip(sites, scanners):
            subjects = [Subject(trial_id=trial.id, site_id=site.id, pseudonym=f"{site.code}-{k:03d}")
                        for k in range(N_SUBJECTS_PER_SITE)]
            s.add_all(subjects)
            s.flush()
            for subject in subjects:
                for v, label in enumerate(("baseline", "follow-up")):
                    visit = Visit(subject_id=subject.id, label=label)
                    s.add(visit)
                    s.flush()
                    study = Study(study_uid=f"1.2.826.0.1.{subject.id}.{v}", site_id=site.id, visit_id=visit.id,
                                  study_date=dt.date(2026, 1, 1) + dt.timedelta(days=90 * v))
                    s.add(study)
                    s.flush()
                    for m, modality in enumerate(("PT", "CT")):
                        n_series += 1
                        received = now - dt.timedelta(hours=rng.uniform(0, 24 * 200))
                        series = Series(series_uid=f"1.2.826.0.1.{subject.id}.{v}.{m}", study_id=study.id,
                                        site_id=site.id, scanner_id=scanner.id, trial_id=trial.id,
                                        modality=modality, kind="trial", received_at=received,
                                        completed_at=received, last_received_at=received, instance_count=100,
                                        expected_count=100, state="complete",
                                        qc_state="done" if modality == "PT" else "pending")
                        s.add(series)
                        s.flush()
                        if modality == "PT" and rng.random() < 0.33:
                            for rule in rng.sample(["uptake_time", "dose_plausible", "weight_present"],
                                                   rng.randint(1, 2)):
                                dev = Deviation(series_id=series.id, rule_id=rule, manual_section="4.2",
                                                manual_version="1.0", severity=rng.choice(["major", "minor"]),
                                                expected="55-75 min", observed="92 min",
                                                message="uptake time outside the window: re-scan or explain")
                                s.add(dev)
                                s.flush()
                                if rng.random() < 0.2:
                                    dev.status = "queried"
                                    s.add(Query(deviation_id=dev.id, site_id=site.id, status="open",
                                                thread=[{"at": now.isoformat(), "by": "phys", "kind": "question",
                                                         "text": "please explain"}]))
            for q in range(20):
                s.add(QuarantineItem(site_id=site.id, source_name=f"object {q}", path=f"quarantine/{site.code}/{q}",
                                     sha256=f"{q:064x}", reason_code="not_dicom", reason="not DICOM: send the file again"))
            s.add(Report(kind="site_qc", site_id=site.id, trial_id=None, path=f"reports/site_qc/{site.code}/v1.html",
                         sha256="0" * 64))
        accounts.add_user(s, "bench-site", role="site", sites=["S07"], password=PASSWORD, actor="bench")
        accounts.add_user(s, "bench-phys", role="physicist", password=PASSWORD, actor="bench")
        accounts.add_user(s, "bench-tm", role="trial-manager", trials=["BENCH-01"], password=PASSWORD, actor="bench")
    return {"series": n_series, "site": "S07"}


def _login(client, name: str) -> None:
    import re

    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    done = client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token})
    assert done.status_code == 303, f"{name} could not log in ({done.status_code})"


def _times(client, url: str, n: int) -> tuple[list[float], int]:
    sizes, times = 0, []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, f"{url}: {response.status_code}"
        sizes = len(response.content)
    return times, sizes


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    import dataclasses

    import httpx
    from fastapi.staticfiles import StaticFiles

    from corelab.settings import load_settings
    from portal.app import create_app
    from portal.serve import portal_server
    from synth.net import free_port, wait_port

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = dataclasses.replace(load_settings({"CORELAB_DATA_DIR": str(work / "data")}),
                                       portal_port=free_port())
        start = time.perf_counter()
        info = populate(settings)
        print(f"store: {N_SITES} sites, {info['series']} series (populated in {time.perf_counter() - start:.1f} s)")
        static_dir = work / "static"
        static_dir.mkdir()
        app = create_app(settings)
        app.mount("/bench-static", StaticFiles(directory=str(static_dir)), name="bench-static")
        server = portal_server(settings)
        server.config.app = app
        server.install_signal_handlers = lambda: None
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_port(settings.portal_port, 30)
        base = f"http://127.0.0.1:{settings.portal_port}"
        pages = [("site grid (site user, 200 series)", "bench-site", f"/sites/{info['site']}"),
                 ("deviation table (trial manager, page 1)", "bench-tm", "/deviations"),
                 ("deviation table (physicist, filtered by site)", "bench-phys", f"/deviations?site={info['site']}"),
                 ("physicist's worklist", "bench-phys", "/worklist")]
        print(f"{'page':48s} {'bytes':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'static p95':>11s} {'ratio':>7s}  target")
        try:
            for label, user, url in pages:
                with httpx.Client(base_url=base, timeout=30) as client:
                    _login(client, user)
                    _times(client, url, 3)  # warm-up: first-use caches of the templates and the store
                    page_ms, size = _times(client, url, REQUESTS)
                    (static_dir / "page.html").write_bytes(b"x" * size)
                    static_ms, _ = _times(client, "/bench-static/page.html", REQUESTS)
                p95, ref = _p95(page_ms), _p95(static_ms)
                print(f"{label:48s} {size:8d} {statistics.median(page_ms):8.1f} {p95:8.1f} {ref:11.1f} "
                      f"{p95 / ref:6.1f}x  {'met' if p95 < TARGET_MS else 'MISSED'} (<{TARGET_MS:.0f} ms)",
                      flush=True)
        finally:
            server.should_exit = True
            thread.join(10)


if __name__ == "__main__":
    main()
