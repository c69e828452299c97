"""A real Orthanc archive on loopback, for the forwarding tests and the DICOMweb benchmarks.

Debian's ``Orthanc`` (package ``orthanc``) runs as a subprocess with the DICOMweb plugin (package
``orthanc-dicomweb``), HTTP Basic authentication and a C-STORE SCP. Storage and index live in the
directory given, so ``stop()`` then ``start()`` keeps what the archive had, on the same ports.

Examples
--------
>>> with Orthanc(tmp_path) as pacs:                                  # doctest: +SKIP
...     client = DICOMwebClient(pacs.dicomweb_url, session=pacs.session())
...     pacs.instances()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import requests

from synth.net import free_port, wait_port

__all__ = ["Orthanc", "OrthancMissing", "orthanc_binary", "DICOMWEB_PLUGIN"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_DEBIAN_BINARY = Path("/usr/sbin/Orthanc")
_RECEIVED = "corelab-received "
# called by Orthanc for every incoming object before it decides to store, replace or ignore it
_COUNT_LUA = f"""function ReceivedInstanceFilter(dicom, origin, info)
  print("{_RECEIVED}" .. dicom["SOPInstanceUID"])
  return true
end
"""
_INSTALL_HINT = "install the Debian packages: apt-get install orthanc orthanc-dicomweb"


class OrthancMissing(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed (tests must fail on this, not skip)."""


def orthanc_binary() -> Path:
    """The Orthanc executable: ``Orthanc`` on PATH, else Debian's ``/usr/sbin/Orthanc``."""
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    if _DEBIAN_BINARY.is_file() and os.access(_DEBIAN_BINARY, os.X_OK):
        return _DEBIAN_BINARY
    raise OrthancMissing(f"the Orthanc executable is not on PATH nor at {_DEBIAN_BINARY}: {_INSTALL_HINT}")


class Orthanc:
    """One Orthanc server whose files live under ``directory``.

    Parameters
    ----------
    directory : path
        Created if missing; holds ``orthanc.json``, ``storage/``, ``index/`` and ``orthanc.log``.
    username, password : str, optional
        The one registered HTTP user; a random password when not given.
    ae_title : str
        Orthanc's own (called) AE title.
    overwrite_instances : bool
        Let a new version of a SOP instance replace the stored one (a corrected object sent again).
        Default False, Orthanc's own default: it keeps the first object of a SOP Instance UID and
        still answers success to a later one.
    count_received : bool
        Log every object Orthanc receives (C-STORE or STOW-RS, stored, replaced or ignored as
        already stored) through a Lua ``ReceivedInstanceFilter``; :meth:`received` counts them.
    start_timeout_s : float
        How long ``start()`` waits for ``/system`` to answer.
    """

    def __init__(self, directory, *, username: str = "corelab", password: str | None = None,
                 ae_title: str = "ORTHANC", overwrite_instances: bool = False,
                 count_received: bool = False, start_timeout_s: float = 30.0) -> None:
        self.directory = Path(directory)
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.ae_title = ae_title
        self.overwrite_instances = overwrite_instances
        self.count_received = count_received
        self.start_timeout_s = start_timeout_s
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.host = "127.0.0.1"
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.http_url + "/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.directory / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.directory / "orthanc.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def session(self) -> requests.Session:
        """A ``requests.Session`` with this server's credentials (for REST or dicomweb-client)."""
        s = requests.Session()
        s.auth = (self.username, self.password)
        return s

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def lua_path(self) -> Path:
        return self.directory / "count-received.lua"

    def _config(self) -> dict:
        lua = {"LuaScripts": [str(self.lua_path)]} if self.count_received else {}
        return {**lua,
            "Name": f"corelab-test-{self.ae_title}",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "OverwriteInstances": self.overwrite_instances,
            "SaveJobs": False,
            "HttpsVerifyPeers": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def start(self) -> "Orthanc":
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        if self.running:
            return self
        binary = orthanc_binary()
        if not DICOMWEB_PLUGIN.is_file():
            raise OrthancMissing(f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing: {_INSTALL_HINT}")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.count_received:
            self.lua_path.write_text(_COUNT_LUA)
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        # the config holds the password: owner-only, like any credential file
        os.chmod(self.config_path, 0o600)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen([str(binary), str(self.config_path)], stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True)
        end = time.monotonic() + self.start_timeout_s
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self._proc.returncode} at start; "
                                   f"see {self.log_path}: {self._log_tail()}")
            try:
                r = requests.get(self.http_url + "/system", auth=(self.username, self.password), timeout=2)
                if r.status_code == 200:
                    wait_port(self.dicom_port, timeout_s=max(1.0, end - time.monotonic()))
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(f"Orthanc did not answer on {self.http_url}/system within {self.start_timeout_s} s; "
                           f"see {self.log_path}")

    def stop(self, kill: bool = False, timeout_s: float = 20.0) -> None:
        """Stop the server; ``kill=True`` sends SIGKILL (a crash). Storage is kept for a restart."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- content ---------------------------------------------------------------------------------
    def _get(self, path: str) -> requests.Response:
        r = requests.get(self.http_url + path, auth=(self.username, self.password), timeout=30)
        r.raise_for_status()
        return r

    def instances(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        return list(self._get("/instances").json())

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance, byte for byte."""
        if not instance_id or not all(c in "0123456789abcdef-" for c in instance_id):
            raise ValueError(f"not an Orthanc instance id: {instance_id!r}")
        return self._get(f"/instances/{instance_id}/file").content

    def sop_instance_uid(self, instance_id: str) -> str:
        """The SOP Instance UID Orthanc recorded for one of its instances."""
        if not instance_id or not all(c in "0123456789abcdef-" for c in instance_id):
            raise ValueError(f"not an Orthanc instance id: {instance_id!r}")
        return self._get(f"/instances/{instance_id}").json()["MainDicomTags"]["SOPInstanceUID"]

    def statistics(self) -> dict:
        """Orthanc's ``/statistics`` (counts of patients, studies, series, instances)."""
        return self._get("/statistics").json()

    def received(self) -> Counter:
        """SOP Instance UID -> how many times Orthanc received it (needs ``count_received``),
        from its log, across restarts."""
        if not self.count_received:
            raise RuntimeError("start Orthanc with count_received=True to count what it receives")
        out: Counter = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            _, hit, uid = line.partition(_RECEIVED)
            if hit:
                out[uid.strip()] += 1
        return out
