"""Settings: one place, one prefix.

Precedence, lowest first: the defaults below, then a TOML settings file, then environment
variables named ``CORELAB_<FIELD>`` (upper case). The settings file is ``$CORELAB_SETTINGS_FILE``
if set, else ``<data_dir>/corelab.toml`` if it exists. Every path lives under the data directory
unless it is set explicitly, so one directory holds a whole core lab.

Each run may save the settings it used (:meth:`Settings.to_file`), so a result can be traced to
the configuration that made it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "CORELAB_"


class SettingsError(ValueError):
    """A setting is malformed; the message names the setting, its source and the fix."""


@dataclass(frozen=True)
class Settings:
    """Typed settings of a corelab installation.

    Attributes
    ----------
    data_dir : Path
        Holds the database, spool, quarantine, reports and site outboxes.
        ``CORELAB_DATA_DIR``, default ``./corelab-data``.
    database_url : str
        SQLAlchemy URL. Default ``sqlite:///<data_dir>/corelab.db``; a PostgreSQL URL
        (``postgresql+psycopg://user:pw@host/db``) switches the store to PostgreSQL.
    ae_title : str
        The DICOM receiver's own AE title.
    dicom_port : int
        TCP port of the DICOM receiver.
    series_stable_s : float
        Seconds without a new instance after which a received series counts as complete.
    prefect_startup_timeout_s : int
        Start-up time-out of Prefect's ephemeral server; its default of 20 s is too short on
        a 2-core machine with a fresh Prefect home.
    task_workers : int
        Upper bound on concurrently running Prefect tasks in one flow run (threads, or Dask
        workers of a local cluster).
    dask : str
        Fan-out on Dask: empty (default: threads in the flow's process), ``local`` (a local Dask
        cluster of ``task_workers`` processes), or a scheduler address (``tcp://host:8786``) of a
        cluster spanning machines.
    smtp_host : str
        SMTP server that e-mails reports to sites (``CORELAB_SMTP_HOST``); empty (the default):
        reports go to the site outboxes only.
    smtp_port : int
        Its port (default 25).
    smtp_from : str
        Sender address of report e-mails.
    smtp_user, smtp_password : str
        Login, when the server asks for one (the password is masked in :meth:`as_dict`).
    smtp_security : str
        ``none``, ``starttls`` or ``ssl``.
    trial_manager_email : str
        Where the trial deviation reports are e-mailed (they never go to a site).
    max_object_bytes : int
        Largest object accepted (file drop, inbox, DICOM), in bytes; a larger one is quarantined
        as ``too_large`` keeping only its first 64 KiB. Default 512 MiB.
    max_inflated_bytes : int
        Largest size a zip member or a deflated-transfer-syntax object may inflate to, checked
        while inflating; beyond it the object is quarantined as ``zip_bomb``. Default 512 MiB.
    max_zip_members : int
        Most members one zip archive may hold (``zip_bomb`` beyond). Default 100,000.
    dicomweb_max_request_bytes : int
        Largest STOW-RS request body (all its parts), in bytes; a larger one is refused with 413
        before anything is stored. Each part is also held to ``max_object_bytes``. Default 4 GiB.
    dicomweb_max_parts : int
        Most parts one STOW-RS request may hold; beyond it the request is refused with 413 and
        nothing is stored (a study of more instances is sent in several requests). Default 5,000.
    dicomweb_staging_budget_bytes : int
        Bytes all STOW-RS requests of this process may stage at once (a declared Content-Length
        is reserved up front, a chunked body as it arrives); a request over it gets 503 with
        Retry-After. Default 8 GiB.
    dicomweb_min_free_bytes : int
        Free space the data directory's disk must keep; a request whose body would go below it
        gets 507 (before reading when its Content-Length says so, else as soon as it does) and
        nothing is stored. Default 2 GiB.
    dicomweb_concurrent_ingests : int
        STOW-RS requests ingesting at once (each holds one object in memory while it is
        checked); the others wait their turn. Default 2.
    portal_public_url : str
        The portal's URL as clients reach it (``https://corelab.example.org``, optionally with
        a port; no path, query or user): DICOMweb answers build their RetrieveURLs from it,
        never from the request's Host header. Empty (the default):
        ``http://<portal_host>:<portal_port>``; set it behind a TLS proxy.
    """

    data_dir: Path = Path("corelab-data")
    database_url: str = ""
    ae_title: str = "CORELAB"
    dicom_port: int = 11112
    series_stable_s: float = 60.0
    prefect_startup_timeout_s: int = 90
    task_workers: int = 2
    dask: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "corelab@localhost"
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_security: str = "none"
    trial_manager_email: str = ""
    max_object_bytes: int = 512 * 2**20
    max_inflated_bytes: int = 512 * 2**20
    max_zip_members: int = 100_000
    dicomweb_max_request_bytes: int = 4 * 2**30
    dicomweb_max_parts: int = 5_000
    dicomweb_staging_budget_bytes: int = 8 * 2**30
    dicomweb_min_free_bytes: int = 2 * 2**30
    dicomweb_concurrent_ingests: int = 2
    portal_public_url: str = ""
    portal_host: str = "127.0.0.1"
    portal_port: int = 8080
    portal_idle_minutes: float = 15.0
    portal_max_failed_logins: int = 5
    portal_lockout_minutes: float = 15.0
    portal_secure_cookies: str = "auto"
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    source: dict = field(default_factory=dict, compare=False, repr=False)

    # The data directory's layout: derived, never configured separately, so it cannot drift.
    @property
    def database_path(self) -> Path | None:
        prefix = "sqlite:///"
        return Path(self.database_url[len(prefix):]) if self.database_url.startswith(prefix) else None

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def incoming_dir(self) -> Path:
        """Where generated or dropped files wait before ingest (the demo writes its trial here)."""
        return self.data_dir / "incoming"

    @property
    def stow_staging_dir(self) -> Path:
        """Where STOW-RS request bodies are staged, one folder per request, until ingested."""
        return self.incoming_dir / "stow"

    @property
    def public_url(self) -> str:
        """The portal's base URL for links given to clients (no trailing slash): ``portal_public_url``,
        else ``http://<portal_host>:<portal_port>``; never taken from a request."""
        if self.portal_public_url:
            return self.portal_public_url.rstrip("/")
        host = f"[{self.portal_host}]" if ":" in self.portal_host else self.portal_host
        return f"http://{host}:{self.portal_port}"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    def site_outbox(self, site_code: str) -> Path:
        """``outbox/<site>``; a site code that is not one plain name raises (see ``corelab.validate.safe_join``)."""
        from corelab.validate import safe_join

        return safe_join(self.outbox_dir, site_code)

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.spool_dir, self.quarantine_dir, self.reports_dir,
                     self.outbox_dir, self.exports_dir, self.incoming_dir):
            path.mkdir(parents=True, exist_ok=True)

    def as_dict(self) -> dict:
        """Settings as plain values; the database password is masked."""
        out = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        out["database_url"] = _mask_password(self.database_url)
        for secret in ("smtp_password", "oidc_client_secret"):
            if getattr(self, secret):
                out[secret] = "***"
        return out

    def to_file(self, path: Path) -> Path:
        """Write the settings in force (password masked) as TOML, for provenance."""
        lines = [f"# corelab settings in force; sources: {self.source}"]
        for key, value in self.as_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        path.write_text("\n".join(lines) + "\n")
        return path


def _mask_password(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return url


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _coerce(name: str, raw, kind, origin: str):
    try:
        if kind is Path or kind == "Path":
            return Path(raw).expanduser()
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(
            f"setting {name!r} from {origin} is {raw!r}, which is not a valid {kind}: fix or unset it"
        ) from exc


def check_public_url(url: str, origin: str = "the settings") -> str:
    """``url`` if it is empty or ``http(s)://host[:port]`` (no user, path, query or fragment), else
    :class:`SettingsError` naming the setting and the fix."""
    if not url:
        return url
    from urllib.parse import urlsplit

    fix = ("set portal_public_url to the portal's URL as clients reach it, scheme and host only, e.g. "
           "https://corelab.example.org or https://corelab.example.org:8443")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SettingsError(f"setting 'portal_public_url' from {origin} is not a URL: {fix}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"setting 'portal_public_url' from {origin} needs http or https and a host: {fix}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise SettingsError(f"setting 'portal_public_url' from {origin} must not hold a user or password: {fix}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise SettingsError(f"setting 'portal_public_url' from {origin} must not hold a path, query or fragment: {fix}")
    if port == 0 or any(c.isspace() for c in url):
        raise SettingsError(f"setting 'portal_public_url' from {origin} has a bad port or a space: {fix}")
    return url


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from defaults, the settings file and the environment.

    Parameters
    ----------
    environ : dict, optional
        The environment to read (default ``os.environ``); tests pass their own.
    """
    env = dict(os.environ if environ is None else environ)
    kinds = {f.name: f.type for f in fields(Settings) if f.name != "source"}
    values: dict = {}
    source: dict = {}

    data_dir_raw = env.get(f"{ENV_PREFIX}DATA_DIR")
    data_dir = Path(data_dir_raw).expanduser() if data_dir_raw else Settings.data_dir
    file_raw = env.get(f"{ENV_PREFIX}SETTINGS_FILE")
    settings_file = Path(file_raw).expanduser() if file_raw else data_dir / "corelab.toml"
    if file_raw and not settings_file.is_file():
        raise SettingsError(
            f"CORELAB_SETTINGS_FILE names {settings_file}, which does not exist: create it or unset it"
        )
    if settings_file.is_file():
        try:
            from_file = tomllib.loads(settings_file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"settings file {settings_file} is not valid TOML: {exc}") from exc
        for key, raw in from_file.items():
            if key not in kinds:
                raise SettingsError(
                    f"settings file {settings_file} has unknown setting {key!r}; known: {sorted(kinds)}"
                )
            values[key] = _coerce(key, raw, kinds[key], str(settings_file))
            source[key] = str(settings_file)

    for key, kind in kinds.items():
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None and raw != "":
            values[key] = _coerce(key, raw, kind, ENV_PREFIX + key.upper())
            source[key] = "env"

    settings = Settings(**values, source=source)
    if settings.portal_secure_cookies not in ("auto", "always", "never"):
        raise SettingsError(f"setting 'portal_secure_cookies' is {settings.portal_secure_cookies!r}; "
                            "use auto, always or never")
    for key in ("max_object_bytes", "max_inflated_bytes", "max_zip_members", "dicomweb_max_request_bytes",
                "dicomweb_max_parts", "dicomweb_staging_budget_bytes", "dicomweb_concurrent_ingests",
                "portal_idle_minutes",
                "portal_max_failed_logins", "portal_lockout_minutes"):
        if getattr(settings, key) <= 0:
            raise SettingsError(f"setting {key!r} from {source.get(key, 'defaults')} is {getattr(settings, key)}; "
                                "it must be a positive number: fix or unset it")
    if settings.dicomweb_min_free_bytes < 0:
        raise SettingsError(f"setting 'dicomweb_min_free_bytes' from {source.get('dicomweb_min_free_bytes', 'defaults')} "
                            f"is {settings.dicomweb_min_free_bytes}; it must be 0 or more bytes: fix or unset it")
    check_public_url(settings.portal_public_url, source.get("portal_public_url", "defaults"))
    if not settings.database_url:
        db_path = (settings.data_dir / "corelab.db").absolute()
        settings = dataclasses.replace(settings, database_url=f"sqlite:///{db_path}")
    return settings
