"""Which task runner the fan-out flows use, from the settings (declared, not hand-rolled)."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from corelab.settings import Settings, load_settings


def task_runner(settings: Settings | None = None):
    """Threads by default; Dask (prefect-dask) when ``CORELAB_DASK`` is ``local`` or an address.

    A local cluster runs ``task_workers`` single-threaded worker processes, so CPU-bound phantom
    analyses run in parallel; an address joins an existing cluster that may span machines (every
    worker then needs the corelab package and the same ``CORELAB_*`` settings, e.g. a PostgreSQL
    ``CORELAB_DATABASE_URL`` and a shared data directory).
    """
    settings = settings or load_settings()
    if not settings.dask:
        return ThreadPoolTaskRunner(max_workers=settings.task_workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.task_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return DaskTaskRunner(address=settings.dask)
