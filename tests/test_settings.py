"""Settings: defaults, settings file, environment; one prefix; clear errors."""

from pathlib import Path

import pytest

from corelab.settings import Settings, SettingsError, load_settings


def test_defaults_put_everything_under_the_data_dir(tmp_path):
    s = load_settings({"CORELAB_DATA_DIR": str(tmp_path / "d")})
    assert s.data_dir == tmp_path / "d"
    assert s.database_url == f"sqlite:///{(tmp_path / 'd' / 'corelab.db').absolute()}"
    for sub in (s.spool_dir, s.quarantine_dir, s.reports_dir, s.outbox_dir, s.exports_dir):
        assert sub.parent == s.data_dir
    assert s.site_outbox("A01") == s.data_dir / "outbox" / "A01"


def test_default_data_dir_is_relative_corelab_data():
    assert load_settings({}).data_dir == Path("corelab-data")


def test_file_then_env_precedence(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "corelab.toml").write_text('ae_title = "FROMFILE"\ndicom_port = 4242\nseries_stable_s = 5\n')
    s = load_settings({"CORELAB_DATA_DIR": str(data_dir), "CORELAB_DICOM_PORT": "11113"})
    assert s.ae_title == "FROMFILE"          # file beats default
    assert s.dicom_port == 11113             # env beats file
    assert s.series_stable_s == 5.0
    assert s.source == {"data_dir": "env", "ae_title": str(data_dir / "corelab.toml"), "dicom_port": "env",
                        "series_stable_s": str(data_dir / "corelab.toml")}


def test_explicit_settings_file(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text('database_url = "postgresql+psycopg://lab:pw-7f3q@db/corelab"\noidc_client_secret = "oidc-9x2k"\n')
    s = load_settings({"CORELAB_SETTINGS_FILE": str(f)})
    assert s.database_url.startswith("postgresql+psycopg://")
    assert s.database_path is None
    for secret in ("pw-7f3q", "oidc-9x2k"):
        assert secret not in str(s.as_dict())
    assert "lab:***@db" in s.as_dict()["database_url"] and s.as_dict()["oidc_client_secret"] == "***"
    out = s.to_file(tmp_path / "used.toml")
    assert "pw-7f3q" not in out.read_text() and "oidc-9x2k" not in out.read_text()
    assert "dicom_port = 11112" in out.read_text()


@pytest.mark.parametrize("env, needle", [
    ({"CORELAB_DICOM_PORT": "eleven"}, "CORELAB_DICOM_PORT"),
    ({"CORELAB_SETTINGS_FILE": "/nonexistent/x.toml"}, "does not exist"),
])
def test_bad_settings_name_the_setting(env, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(env)


def test_unknown_key_in_file_is_refused(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("dicom_prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'dicom_prot'"):
        load_settings({"CORELAB_SETTINGS_FILE": str(f)})


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().ae_title = "X"  # type: ignore[misc]
