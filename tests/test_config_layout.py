"""Settings precedence and the path layout."""

import os
import time
from pathlib import Path

import pytest

from pipeline.atomic import atomic_path, pid_alive, remove_stale_temps, temp_name
from pipeline.config import Settings, redact_url
from pipeline.errors import ConfigError
from pipeline.layout import AnimalLayout, section_key


def test_defaults_are_sqlite_under_data_root(tmp_path):
    s = Settings.load({"data_root": tmp_path}, env={})
    assert s.database_url == f"sqlite:///{tmp_path.as_posix()}/slidepipe.db"
    assert s.workers >= 1 and s.queue_url is None and s.debug is False


def test_flags_beat_env_beat_toml(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[slidepipe]\nworkers = 3\ndata_root = "/from/toml"\ndb_url = "sqlite:///toml.db"\n')
    env = {"SLIDEPIPE_WORKERS": "5", "SLIDEPIPE_DEBUG": "true"}
    s = Settings.load({}, env=env, config_file=toml)
    assert (s.workers, s.data_root, s.db_url, s.debug) == (5, Path("/from/toml"), "sqlite:///toml.db", True)
    s = Settings.load({"workers": 7, "db_url": None}, env=env, config_file=toml)
    assert s.workers == 7 and s.db_url == "sqlite:///toml.db"


def test_config_file_from_env(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text("queue_url = 'fq:///tmp/q'\n")
    assert Settings.load({}, env={"SLIDEPIPE_CONFIG": str(toml)}).queue_url == "fq:///tmp/q"


@pytest.mark.parametrize("flags,message", [
    ({"workers": "many"}, "workers must be an integer"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"db_url": "not a url"}, "not a valid URL"),
])
def test_bad_settings_are_clear(flags, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(flags, env={})


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("workers = [")
    with pytest.raises(ConfigError, match="bad.toml"):
        Settings.load({}, env={}, config_file=bad)
    with pytest.raises(ConfigError, match="unknown setting"):
        bad.write_text("colour = 'red'\n")
        Settings.load({}, env={}, config_file=bad)


def test_password_never_printed():
    url = "mysql+pymysql://user:s3cret@db.example/slidepipe"
    s = Settings.load({"db_url": url}, env={})
    assert "s3cret" not in s.safe_database_url and "s3cret" not in redact_url(url)
    assert "user" in s.safe_database_url


def test_layout_paths(tmp_path):
    lay = AnimalLayout(tmp_path, "DK1")
    assert lay.czi_dir == tmp_path / "DK1" / "czi"
    assert lay.extracted_tif("DK1_slide002", 0, 2) == tmp_path / "DK1/preps/tif/DK1_slide002_S1_C2.tif"
    assert lay.extracted_thumbnail("x", 3, 1).parent == tmp_path / "DK1/preps/thumbnail_original"
    key = section_key("DK1_slide002", 2)
    assert key == "DK1_slide002_S3" and lay.extracted_name("DK1_slide002", 2, 1) == f"{key}_C1.tif"
    assert lay.cleaned(2, True, key) == tmp_path / "DK1/preps/CH2/thumbnail_cleaned/DK1_slide002_S3.tif"
    assert lay.aligned(1, False, key) == tmp_path / "DK1/preps/CH1/full_aligned/DK1_slide002_S3.tif"
    assert lay.mask(key) == tmp_path / "DK1/preps/masks/CH1/thumbnail_masked/DK1_slide002_S3.tif"
    with pytest.raises(TypeError, match="section_key"):
        lay.mask(3)  # files are named by the section, never by a position
    assert lay.precomputed_layer(1, True, rechunkme=True).name == "C1T_rechunkme"
    assert lay.precomputed_layer(2, False).name == "C2"
    assert lay.omezarr(1) == tmp_path / "DK1/www/omezarr/C1.ome.zarr"
    rel = lay.relative(lay.aligned(1, True, key))
    assert rel == "DK1/preps/CH1/thumbnail_aligned/DK1_slide002_S3.tif" and lay.absolute(rel) == lay.aligned(1, True, key)


def test_atomic_path_renames_only_on_success(tmp_path):
    final = tmp_path / "sub" / "a.tif"
    with atomic_path(final) as tmp:
        assert tmp.name.endswith(".tif") and ".tmp-" in tmp.name
        tmp.write_bytes(b"x")
        assert not final.exists()
    assert final.read_bytes() == b"x"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert final.read_bytes() == b"x" and list(final.parent.iterdir()) == [final]


def test_stale_temp_of_dead_process_removed(tmp_path):
    stale = tmp_path / "a.tmp-999999999.tif"
    stale.write_bytes(b"partial")
    mine = temp_name(tmp_path / "b.tif")
    mine.write_bytes(b"in progress")
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and mine.exists()


def test_temp_of_a_zombie_is_stale(tmp_path):
    """A SIGKILLed runner's pool workers stay zombies until PID 1 reaps them: their temp files
    are a dead process's (found by the kill tests: a rerun right after the kill kept them)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].startswith(" Z") and time.monotonic() < deadline:
            time.sleep(0.01)
        left = tmp_path / f"a.tmp-{pid}.tif"
        left.write_bytes(b"partial")
        assert not pid_alive(pid)
        assert remove_stale_temps(tmp_path) == 1 and not left.exists()
    finally:
        os.waitpid(pid, 0)
    assert pid_alive(os.getpid())
