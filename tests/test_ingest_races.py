"""Two writers of one new series at once (two associations, two STOW-RS requests, the upload page's
parallel senders): whatever the interleaving, both objects are stored in the one series.

The interleaving is forced, not hoped for: a rival object of the same new series is committed by
another connection just before the n-th statement the first writer runs, for every n up to the
first writer's own first write (after that the database's unique indexes and the store's retry
decide, which :mod:`tests.test_receiver` exercises under real concurrency).
"""

from __future__ import annotations

import pytest
from sqlmodel import func, select

from corelab.db import open_store, session_scope
from corelab.models import Instance, QuarantineItem, Series, Site, Study
from corelab.receiver_store import Store
from tests import hostile_objects as hostile
from tests.interleave import Interleave
from tests.test_ingest import _lab_with_two_sites, _send

def _site_id(settings, code: str) -> int:
    with session_scope(settings) as s:
        return s.exec(select(Site.id).where(Site.code == code)).one()


def _accept_with_rival_before(settings, n: int, how: str, tmp_path, *,
                              rival_site: str = "A01") -> tuple[object, object, bool]:
    """Accept object 1 of a new series for A01 (through the node's Store, or a file drop) while
    object 2 (same study and series) is committed for ``rival_site`` before object 1's ``n``-th
    statement. Returns both outcomes and whether the rival came before object 1 wrote anything
    (False: ``n`` was past that point and the rival came after)."""
    first = hostile.dataset()
    second = hostile.dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
    engine = open_store(settings)

    def rival():
        return Store(settings, engine).accept(hostile.encode(second), sop_instance_uid=second.SOPInstanceUID,
                                              site_id=_site_id(settings, rival_site), source="x", ordinal=2)

    with Interleave(engine, n, rival) as forced:
        out = _send(settings, hostile.encode(first), "A01", how, tmp_path)
    return out, forced.result if forced.in_time else rival(), forced.in_time


@pytest.mark.parametrize("how", ["store", "drop"])
def test_a_rival_writer_of_the_same_new_series_never_makes_it_a_uid_conflict(store_settings, how, tmp_path):
    _lab_with_two_sites(store_settings)
    forced = 0
    for n in range(40):
        first, second, in_time = _accept_with_rival_before(store_settings, n, how, tmp_path)
        assert (first.status, second.status) == ("stored", "stored"), (n, first.reason, second.reason)
        assert first.series_uid == second.series_uid
        forced += in_time
        if not in_time:
            break
    assert forced >= 4, "the rival never came between the first writer's reads: the test proves nothing"
    with session_scope(store_settings) as s:
        assert s.exec(select(func.count()).select_from(QuarantineItem)).one() == 0
        assert s.exec(select(func.count()).select_from(Series)).one() == forced + 1
        assert s.exec(select(func.count()).select_from(Study)).one() == forced + 1
        assert s.exec(select(func.count()).select_from(Instance)).one() == 2 * (forced + 1)


@pytest.mark.parametrize("how", ["store", "drop"])
def test_another_sites_rival_object_is_still_refused_whichever_commits_first(store_settings, how, tmp_path):
    """B02 naming the same new study and series at the same moment: one site gets the series, the
    other's object is a uid_conflict, never attached to it, at every point of the interleaving."""
    _lab_with_two_sites(store_settings)
    sites = {code: _site_id(store_settings, code) for code in ("A01", "B02")}
    for n in range(40):
        first, second, in_time = _accept_with_rival_before(store_settings, n, how, tmp_path, rival_site="B02")
        assert sorted((first.status, second.status)) == ["quarantined", "stored"], (n, first.reason, second.reason)
        winner, loser = (first, second) if first.status == "stored" else (second, first)
        assert loser.reason_code == "uid_conflict"
        with session_scope(store_settings) as s:
            series = s.exec(select(Series).where(Series.series_uid == winner.series_uid)).one()
            assert series.site_id == sites["A01" if winner is first else "B02"]
            assert s.get(Study, series.study_id).site_id == series.site_id
            assert len(s.exec(select(Instance).where(Instance.series_id == series.id)).all()) == 1
        if not in_time:
            break
    assert n >= 4, "the rival never came between the first writer's reads: the test proves nothing"
