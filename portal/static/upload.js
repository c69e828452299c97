/* corelab upload page: the portal's one script (CSP script-src 'self'; no inline code, no eval).
 *
 * Folder / files: one STOW-RS request per file (multipart/related; type="application/dicom"),
 * SENDERS at a time. A lost connection, a 5xx or a 429 is retried with back-off; after RETRIES
 * the file is left "not acknowledged" and Resume sends again only those. The server judges every
 * file: 200 stored, 202/409 with a FailedSOPSequence quarantined (the reason is shown).
 * Zip: created with its size, sent in chunks with Content-Range; a chunk refused with 409 carries
 * the server's offset and the upload goes on from there; then finished: the core lab answers 202 and
 * ingests the zip as a file drop in the background, and the page polls the upload until its summary
 * is there (a failed ingest leaves Resume, which finishes again).
 * File names stay in the browser: the page shows files by number, never by name.
 */
(function () {
  "use strict";
  var root = document.getElementById("upload");
  if (!root) { return; }
  var cfg = {
    csrf: root.dataset.csrf, site: root.dataset.site, stowUrl: root.dataset.stowUrl,
    zipUrl: root.dataset.zipUrl, chunk: Number(root.dataset.chunkBytes), siteUrl: root.dataset.siteUrl
  };
  var SENDERS = 3;
  var BACKOFF_MS = [300, 1000, 2000, 4000];   // RETRIES = its length: five tries in all
  var RETRIES = BACKOFF_MS.length;
  var POLL_MS = 1000;                          // while the core lab checks a zip
  var FAILED_SOP_SEQUENCE = "00081198", FAILURE_REASON = "00081197";
  var PRIVATE_CREATOR = "00090010", CORELAB_REASON = "00091001";

  var items = [];          // {n, file, status: waiting|sending|stored|quarantined|failed|unsent, reason}
  var zipJob = null;       // {file, id, offset, done}
  var running = 0;         // jobs in progress (the files' senders count as one, a zip as one)
  var sendingFiles = false, sendingZip = false;

  function $(id) { return document.getElementById(id); }
  // (buttons are display:inline-block in portal.css, which beats [hidden]: hide their row instead)
  function show(id, on) { $(id).hidden = !on; }
  function text(id, value) { $(id).textContent = String(value); }
  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }
  function retryable(status) { return status === 0 || status === 429 || status >= 500; }

  function boundary() {
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return "corelab-" + Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  async function call(url, options) {
    // status 0: the connection was lost (fetch rejected); the body is read as JSON when it is JSON.
    options.credentials = "same-origin";
    options.headers = Object.assign({"X-CSRF-Token": cfg.csrf}, options.headers || {});
    var response;
    try { response = await fetch(url, options); } catch (e) { return {status: 0, body: null}; }
    var body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    return {status: response.status, body: body, headers: response.headers};
  }

  function detail(body, status) {
    if (body && typeof body.detail === "string") { return body.detail; }
    if (body && Array.isArray(body.detail)) { return body.detail.map(function (d) { return d.field + ": " + d.problem; }).join("; "); }
    return status === 0 ? "the connection was lost" : "the server answered " + status;
  }

  function failureOf(body) {
    // The reason of the one instance sent: corelab puts it in its private element (0009,1001),
    // creator CORELAB (see services/stow.py); another server gives at least FailureReason.
    var seq = body && body[FAILED_SOP_SEQUENCE];
    var item = seq && seq.Value && seq.Value[0];
    if (!item) { return null; }
    var creator = item[PRIVATE_CREATOR] && item[PRIVATE_CREATOR].Value ? item[PRIVATE_CREATOR].Value[0] : "";
    var reason = creator === "CORELAB" && item[CORELAB_REASON] && item[CORELAB_REASON].Value ? item[CORELAB_REASON].Value[0] : "";
    var code = item[FAILURE_REASON] && item[FAILURE_REASON].Value ? item[FAILURE_REASON].Value[0] : null;
    return (reason || "refused by the server") + (code !== null ? " (failure reason 0x" + code.toString(16).toUpperCase() + ")" : "");
  }

  // --- progress -------------------------------------------------------------------------------------

  function refresh() {
    var count = {stored: 0, quarantined: 0, failed: 0, unsent: 0, waiting: 0, sending: 0};
    var doneBytes = 0, totalBytes = 0;
    items.forEach(function (it) {
      count[it.status] += 1;
      totalBytes += it.file.size;
      if (it.status === "stored" || it.status === "quarantined") { doneBytes += it.file.size; }
    });
    var done = count.stored + count.quarantined;
    text("files-done", done); text("files-total", items.length);
    text("bytes-done", doneBytes); text("bytes-total", totalBytes);
    $("files-bar").max = Math.max(items.length, 1); $("files-bar").value = done;
    text("n-stored", count.stored); text("n-quarantined", count.quarantined);
    text("n-failed", count.failed + count.unsent); text("n-left", count.waiting + count.sending + count.unsent + count.failed);
    return count;
  }

  function addReason(label, reason) {
    var li = document.createElement("li");
    li.textContent = label + ": " + reason;
    $("reasons").appendChild(li);
    show("reasons-title", true);
  }

  function setStatus(message) { text("status", message); }

  function settle() {
    var unsentFiles = items.filter(function (it) { return it.status === "unsent" || it.status === "failed"; }).length;
    var zipLeft = zipJob && !zipJob.done;
    show("resume-row", unsentFiles > 0 || zipLeft);
    if (running > 0) { return; }
    var parts = [];
    if (items.length) {
      var c = refresh();
      parts.push(unsentFiles ? unsentFiles + " of " + items.length + " files not acknowledged: press Resume to send them again"
                             : "All " + items.length + " files acknowledged: " + c.stored + " stored, " + c.quarantined + " quarantined");
    }
    if (zipJob) {
      parts.push(zipJob.done ? "the zip is in and was checked"
                 : zipJob.offset >= zipJob.file.size ? "the zip is in but its check did not finish: press Resume to finish it"
                 : "the zip is not complete (" + zipJob.offset + " of " + zipJob.file.size + " bytes received): press Resume to go on");
    }
    setStatus(parts.join("; ") + ".");
    show("done", !unsentFiles && !zipLeft);
  }

  // --- files: one STOW-RS request each -----------------------------------------------------------------

  async function sendOne(it) {
    for (var attempt = 0; ; attempt++) {
      var b = boundary();
      var body = new Blob(["--" + b + "\r\nContent-Type: application/dicom\r\n\r\n", it.file, "\r\n--" + b + "--\r\n"]);
      var r = await call(cfg.stowUrl, {method: "POST", body: body, headers: {
        "Content-Type": "multipart/related; type=\"application/dicom\"; boundary=" + b, "Accept": "application/dicom+json"}});
      var failure = failureOf(r.body);
      if (r.status === 200 && !failure) { it.status = "stored"; return; }
      if ((r.status === 200 || r.status === 202 || r.status === 409) && failure) {
        it.status = "quarantined"; it.reason = failure; addReason("file #" + it.n, failure); return;
      }
      if (r.status === 401 || r.status === 403) {
        it.status = "unsent"; it.reason = detail(r.body, r.status);
        setStatus("The core lab refused the upload (" + it.reason + "): log in again in another tab, then press Resume.");
        return "stop";
      }
      if (!retryable(r.status)) { it.status = "failed"; it.reason = detail(r.body, r.status); addReason("file #" + it.n + " (not stored)", it.reason); return; }
      if (attempt >= RETRIES) { it.status = "unsent"; it.reason = detail(r.body, r.status); return; }
      await sleep(BACKOFF_MS[attempt]);
    }
  }

  async function sender() {
    for (;;) {
      var it = items.find(function (x) { return x.status === "waiting"; });
      if (!it) { return; }
      it.status = "sending";
      refresh();
      var outcome = await sendOne(it);
      refresh();
      if (outcome === "stop") {
        items.forEach(function (x) { if (x.status === "waiting") { x.status = "unsent"; } });
        return;
      }
    }
  }

  async function runFiles() {
    if (sendingFiles) { return; }  // the senders at work take the new files too: never more than SENDERS
    sendingFiles = true;
    show("progress", true); show("files-progress", true); show("done", false);
    setStatus("Sending " + items.filter(function (x) { return x.status === "waiting"; }).length + " files…");
    running += 1;
    // Again while files wait: ones added when only the last sender was still at work.
    while (items.some(function (x) { return x.status === "waiting"; })) {
      var senders = [];
      for (var i = 0; i < SENDERS; i++) { senders.push(sender()); }
      await Promise.all(senders);
    }
    sendingFiles = false;
    running -= 1;
    refresh();
    settle();
  }

  function startFiles() {
    var chosen = [].concat(Array.from($("folder").files), Array.from($("files").files));
    if (!chosen.length) { setStatus("Choose a folder or files first."); show("progress", true); return; }
    var first = items.length;
    chosen.forEach(function (f, i) { items.push({n: first + i + 1, file: f, status: "waiting", reason: ""}); });
    $("folder").value = ""; $("files").value = "";
    runFiles();
  }

  // --- zip: chunks with Content-Range, then finish -------------------------------------------------------

  function zipKey(file) { return "corelab-zip:" + cfg.site + ":" + file.size + ":" + file.lastModified; }

  function zipProgress() {
    text("zip-done", zipJob.offset); text("zip-total", zipJob.file.size);
    $("zip-bar").max = Math.max(zipJob.file.size, 1); $("zip-bar").value = zipJob.offset;
  }

  async function withRetries(request) {
    // request() -> {status, body}; retried with back-off while the answer is a lost connection or 5xx.
    for (var attempt = 0; ; attempt++) {
      var r = await request();
      if (!retryable(r.status) || attempt >= RETRIES) { return r; }
      await sleep(BACKOFF_MS[attempt]);
    }
  }

  async function zipOpen(file) {
    var known = window.localStorage.getItem(zipKey(file));
    if (known) {
      var r = await withRetries(function () { return call(cfg.zipUrl + "/" + known, {method: "GET", headers: {"Accept": "application/json"}}); });
      if (r.status === 200) { zipJob.id = known; zipJob.offset = r.body.offset; return true; }
      if (r.status !== 404) { setStatus("Asking where the zip stands failed: " + detail(r.body, r.status)); return false; }
    }
    var c = await withRetries(function () {
      return call(cfg.zipUrl, {method: "POST", body: JSON.stringify({name: file.name, size: file.size, site: cfg.site}),
                               headers: {"Content-Type": "application/json", "Accept": "application/json"}});
    });
    if (c.status !== 201) { setStatus("The zip was not accepted: " + detail(c.body, c.status)); return false; }
    zipJob.id = c.body.upload; zipJob.offset = 0;
    window.localStorage.setItem(zipKey(file), zipJob.id);
    return true;
  }

  async function zipChunks() {
    var file = zipJob.file, failures = 0;
    while (zipJob.offset < file.size) {
      var end = Math.min(zipJob.offset + cfg.chunk, file.size);
      var r = await call(cfg.zipUrl + "/" + zipJob.id, {method: "PUT", body: file.slice(zipJob.offset, end), headers: {
        "Content-Type": "application/octet-stream", "Accept": "application/json",
        "Content-Range": "bytes " + zipJob.offset + "-" + (end - 1) + "/" + file.size}});
      if (r.status === 200 || (r.status === 409 && r.body && typeof r.body.offset === "number")) {
        zipJob.offset = r.body.offset; failures = 0; zipProgress(); continue;
      }
      // 409 without an offset: our own earlier try of this chunk is still being received; wait.
      if (!retryable(r.status) && r.status !== 409) { setStatus("A piece of the zip was refused: " + detail(r.body, r.status)); return false; }
      if (failures >= RETRIES) { return false; }
      await sleep(BACKOFF_MS[failures]);
      failures += 1;
      var s = await call(cfg.zipUrl + "/" + zipJob.id, {method: "GET", headers: {"Accept": "application/json"}});
      if (s.status === 200) { zipJob.offset = s.body.offset; zipProgress(); }
    }
    return true;
  }

  function zipSummary(summary) {
    ["objects", "stored", "duplicates", "quarantined"].forEach(function (k) { text("z-" + k, summary[k]); });
    text("z-new-versions", summary.new_versions);
    show("zip-summary", true);
    $("zip-series").textContent = "";
    (summary.series || []).forEach(function (s) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = s.url; a.textContent = s.modality + " series, " + s.instances + " instances";
      li.appendChild(a);
      $("zip-series").appendChild(li);
    });
    (summary.quarantine || []).forEach(function (q) { addReason("in the zip", q.reason); });
  }

  async function zipPoll() {
    // After a 202: ask the upload's state until the ingest is over -> {status, body: summary or error}.
    for (var failures = 0; ; ) {
      await sleep(POLL_MS);
      var r = await call(cfg.zipUrl + "/" + zipJob.id, {method: "GET", headers: {"Accept": "application/json"}});
      if (r.status === 200 && r.body) {
        failures = 0;
        if (r.body.state === "finished" && r.body.summary) { return {status: 200, body: r.body.summary}; }
        if (r.body.state === "failed") { return {status: 503, body: {detail: r.body.detail}}; }
        continue;  // still ingesting (or waiting for the one before it)
      }
      if (!retryable(r.status) || failures >= RETRIES) { return r; }
      await sleep(BACKOFF_MS[failures]);
      failures += 1;
    }
  }

  async function runZip() {
    if (sendingZip) { return; }
    sendingZip = true;
    show("progress", true); show("zip-progress", true); show("done", false);
    running += 1;
    try {
      if (!zipJob.id && !(await zipOpen(zipJob.file))) { return; }
      zipProgress();
      setStatus("Sending the zip…");
      if (!(await zipChunks())) { return; }
      setStatus("The zip is in; the core lab is checking every file in it…");
      var f = await withRetries(function () {
        return call(cfg.zipUrl + "/" + zipJob.id + "/finish", {method: "POST", headers: {"Accept": "application/json"}});
      });
      if (f.status === 202) { f = await zipPoll(); }
      if (f.status !== 200) { setStatus("Finishing the zip failed: " + detail(f.body, f.status)); return; }
      zipJob.done = true;
      window.localStorage.removeItem(zipKey(zipJob.file));
      zipSummary(f.body);
    } finally {
      sendingZip = false;
      running -= 1;
      settle();
    }
  }

  function startZip() {
    if (sendingZip) { setStatus("A zip is being sent: wait for it to finish."); return; }
    var file = $("zip").files[0];
    if (!file) { setStatus("Choose a zip first."); show("progress", true); return; }
    zipJob = {file: file, id: null, offset: 0, done: false};
    runZip();
  }

  function resume() {
    show("resume-row", false);
    if (items.some(function (it) { return it.status === "unsent" || it.status === "failed"; })) {
      items.forEach(function (it) { if (it.status === "unsent" || it.status === "failed") { it.status = "waiting"; } });
      runFiles();
    }
    if (zipJob && !zipJob.done) { runZip(); }
  }

  $("send-files").addEventListener("click", startFiles);
  $("send-zip").addEventListener("click", startZip);
  $("resume").addEventListener("click", resume);
}());
