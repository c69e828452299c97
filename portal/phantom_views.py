"""The fill-sheet form of a phantom series: the physicist, or the site that sent the scan, gives it.

One route, ``POST /series/{id}/fill-sheet`` (pasted text or a file, CSRF-checked), calling the
same use case as ``corelab phantom fill`` (:func:`services.phantoms.attach_fill_sheet`). Another
site's series answers 404, as one that does not exist. A site gives the sheet while its series
awaits one; replacing a sheet is the physicist's (403 for a site). A series being analysed
answers 409; a body over :data:`portal.body_limit.MAX_FORM_BYTES` is refused (413) from its
Content-Length before it is parsed, by the portal's body guard. The form itself is on the series page (``series.html``); a refused sheet is shown
there again with the reason.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from corelab.limits import MAX_FILL_SHEET_BYTES
from phantoms.fill import FillSheetError
from portal.pages import done, not_found, page
from portal.security import Ctx, require
from services import phantoms, site_view
from services.access import may_see

router = APIRouter()

_NEXT = {
    "queued": "It is queued for accreditation: the next accredit-scanners run analyses it.",
    "pending": "Its accreditation starts when the DICOM node next looks for completed series, or at the next "
               "accredit-scanners run.",
}


def _attach(ctx: Ctx, series_id: int, data: bytes) -> tuple[dict | None, str, int, dict | None]:
    """In a worker thread (it writes and fsyncs): ``(result, '', 200, None)``, or ``(None, why,
    status, the series page's data)`` when refused (nothing changed)."""
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "series", series_id):
            raise not_found("series")
        try:
            # A site gives the sheet its series awaits; replacing one (after a verdict, say) is
            # the physicist's, so a site cannot re-judge a scan with values of its choosing.
            return phantoms.attach_fill_sheet(s, ctx.settings, series_id, data, actor=ctx.scope.user,
                                              replace=ctx.scope.reviews), "", 200, None
        except phantoms.ReplaceRefused as exc:
            error, status = f"{exc}; nothing was changed", 403
        except phantoms.SeriesBusy as exc:
            error, status = f"{exc}; nothing was changed", 409
        except (FillSheetError, phantoms.FillSheetRefused) as exc:
            error, status = f"{exc}; nothing was changed", 400
    with ctx.db() as s:
        return None, error, status, site_view.series_detail(s, series_id, settings=ctx.settings)


@router.post("/series/{series_id}/fill-sheet")
async def fill_sheet(request: Request, series_id: int, ctx: Ctx = Depends(require("physicist", "site"))):
    """Attach the fill sheet given in the form (the file when one is chosen, else the text)."""
    form = await request.form(max_files=1, max_fields=4, max_part_size=MAX_FILL_SHEET_BYTES + 1)
    file, text = form.get("file"), form.get("text")
    text = text if isinstance(text, str) else ""
    if isinstance(file, UploadFile) and file.filename:
        data = await file.read(MAX_FILL_SHEET_BYTES + 1)  # one byte over is enough to refuse it
    else:
        data = text.encode("utf-8")
    result, error, status, series = await run_in_threadpool(_attach, ctx, series_id, data)
    if result is not None:
        replaced = " It replaces the sheet given before." if result["replaced"] else ""
        return done(request, ctx, f"/series/{series_id}",
                    f"Fill sheet ({result['kind']}, sha256 {result['sha256'][:12]}) attached.{replaced} "
                    f"{_NEXT.get(result['qc_state'], '')}")
    return page(request, ctx, "series.html", status_code=status, series=series, fill_error=error,
                fill_text=text[:MAX_FILL_SHEET_BYTES])
