import json
import re
from pathlib import Path

import pytest

from emu import config
from emu.config import (
    KEYS,
    SECTIONS,
    Config,
    ConfigError,
    load_config,
    scenario_names,
)
from emu.migration.ram import TARGET_PAGE

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


def write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(sets: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    return str(err.value)


def test_defaults():
    cfg = load_config()
    assert {name: cfg[name] for name in KEYS} == {name: key.default for name, key in KEYS.items()}
    assert cfg["migration.postcopy-ram"] is True
    assert cfg["migration.postcopy-preempt"] is False
    assert cfg["migration.max-bandwidth"] == 128 * MiB
    assert cfg["migration.max-postcopy-bandwidth"] == 0
    assert cfg["migration.downtime-limit"] == pytest.approx(0.3)
    assert cfg["migration.switchover-after"] == 0.5
    assert cfg["link.bandwidth"] == 125e6
    assert cfg["link.rtt"] == pytest.approx(200e-6)
    assert cfg["link.socket-buffer"] == 4 * MiB
    assert cfg["guest.ram"] == 256 * MiB
    assert cfg["guest.vcpus"] == 1
    assert cfg["workload.pattern"] == "random"
    assert cfg["emulator.chunk"] == 128 * 1024
    assert cfg["emulator.time-scale"] == "auto"  # chosen per run: emu/figures/timescale.py
    assert cfg["faults"] == []


def test_default_of_every_key_is_allowed():
    for key in KEYS.values():
        assert key.parse(key.default) == key.default


def test_derived_helpers():
    cfg = load_config(None, ["guest.page-size=2MiB", "guest.ram=64MiB"])
    assert cfg.page_size == 2 * MiB
    assert cfg.npages == 32
    assert cfg.target_pages_per_host_page == 2 * MiB // TARGET_PAGE == 512
    assert load_config().target_pages_per_host_page == 1


def test_toml_file(tmp_path):
    path = write(
        tmp_path,
        """
        [migration]
        postcopy-preempt = true
        max-postcopy-bandwidth = "1Gbit/s"
        [link]
        bandwidth = "10Gbit"
        rtt = 0.001
        [guest]
        ram = 1073741824
        page-size = "2M"
        vcpus = 4
        [workload]
        pattern = "hotset"
        hot-fraction = 1
        """,
    )
    cfg = load_config(path)
    assert cfg["migration.postcopy-preempt"] is True
    assert cfg["migration.max-postcopy-bandwidth"] == 125e6
    assert cfg["link.bandwidth"] == 1.25e9
    assert cfg["link.rtt"] == 0.001
    assert cfg["guest.ram"] == 2**30
    assert cfg["guest.page-size"] == 2 * MiB
    assert cfg["guest.vcpus"] == 4
    assert cfg["workload.pattern"] == "hotset"
    assert cfg["workload.hot-fraction"] == 1.0
    assert cfg["link.socket-buffer"] == 4 * MiB  # untouched keys keep their defaults


def test_sets_beat_the_file(tmp_path):
    path = write(tmp_path, '[link]\nbandwidth = "10Gbit"\n[guest]\nvcpus = 2\n')
    cfg = load_config(str(path), ["link.bandwidth=100Mbit", "guest.vcpus=3", "guest.vcpus=5"])
    assert cfg["link.bandwidth"] == 12.5e6
    assert cfg["guest.vcpus"] == 5  # the last --set wins


def test_sets_can_fix_a_bad_file_value(tmp_path):
    path = write(tmp_path, "[migration]\npostcopy-ram = false\npostcopy-preempt = true\n")
    assert load_config(path, ["migration.postcopy-ram=true"])["migration.postcopy-preempt"]


def test_with_overrides_returns_a_new_config():
    cfg = load_config()
    faster = cfg.with_overrides(["link.bandwidth=10Gbit/s", " link.rtt = 1ms "])
    assert faster["link.bandwidth"] == 1.25e9
    assert faster["link.rtt"] == 0.001
    assert cfg["link.bandwidth"] == 125e6
    with pytest.raises(ConfigError, match="link.rtt"):
        cfg.with_overrides(["link.rtt=fast"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("yes", True), ("on", True), ("1", True), ("TRUE", True)]
    + [("false", False), ("no", False), ("off", False), ("0", False), ("Off", False)],
)
def test_bool_text(text, expected):
    assert load_config(None, [f"emulator.payload={text}"])["emulator.payload"] is expected


def test_every_key_round_trips_through_set_text():
    cfg = load_config(None, ["link.bandwidth=1.25GB/s", "workload.touch-cost=500ns"])
    sets = [f"{name}={key.show(cfg[name])}" for name, key in KEYS.items()]
    assert load_config(None, sets) == cfg


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["guest.page-size=8KiB"], "guest.page-size: must be one of 4KiB, 2MiB, 1GiB (got 8KiB)"),
        (
            ["migration.postcopy-ram=false", "migration.postcopy-preempt=true"],
            "migration.postcopy-preempt: requires migration.postcopy-ram=true",
        ),
        (
            ["migration.postcopy-preempt=maybe"],
            "migration.postcopy-preempt: must be true or false (got 'maybe')",
        ),
        (
            ["link.bandwidth=0"],
            "link.bandwidth: must be > 0 and <= 10Tbit/s, e.g. 10Gbit or 1.25GB/s (got 0)",
        ),
        (
            ["guest.page-size=2MiB", "guest.ram=3MiB"],
            "guest.ram: must be a multiple of guest.page-size 2MiB (got 3MiB)",
        ),
        (
            ["guest.page-size=1GiB"],
            "guest.ram: must be at least guest.page-size 1GiB (got 256MiB)",
        ),
        (
            ["guest.ram=16KiB", "guest.vcpus=8"],
            "guest.vcpus: must be at most guest.ram / 4KiB = 4 (got 8)",
        ),
        (
            ["link.socket-buffer=4KiB"],
            "link.socket-buffer: must be between 64KiB and 1GiB (got 4KiB)",
        ),
        (["link.rtt=-1ms"], "link.rtt: must be between 0 and 10s, e.g. 200us or 1.5s (got -1ms)"),
        (["guest.vcpus=0"], "guest.vcpus: must be between 1 and 256 (got 0)"),
        (["guest.vcpus=257"], "guest.vcpus: must be between 1 and 256 (got 257)"),
        (["guest.vcpus=1.5"], "guest.vcpus: must be a whole number (got '1.5')"),
        (
            ["workload.pattern=zigzag"],
            "workload.pattern: must be one of sequential, random, stride, hotset, ab "
            "(got 'zigzag')",
        ),
        (["workload.touch-cost=0"], "workload.touch-cost: must be > 0"),
        (
            ["workload.stride=6KiB"],
            "workload.stride: must be > 0 and <= 16TiB, a multiple of 4KiB (got 6KiB)",
        ),
        (["workload.hot-fraction=0"], "workload.hot-fraction: must be > 0 and <= 1 (got 0)"),
        (["workload.hot-probability=1.5"], "workload.hot-probability: must be between 0 and 1"),
        (["emulator.time-scale=0"],
         "emulator.time-scale: must be a number in (0, 100] or auto (got 0)"),
        (["emulator.time-scale=101"],
         "emulator.time-scale: must be a number in (0, 100] or auto (got 101)"),
        (["emulator.time-scale=nan"],
         "emulator.time-scale: must be a number in (0, 100] or auto (got 'nan')"),
        (["emulator.time-scale=fast"],
         "emulator.time-scale: must be a number in (0, 100] or auto (got 'fast')"),
        (
            ["emulator.seed=-1"],
            "emulator.seed: must be between 0 and 18446744073709551615 (got -1)",
        ),
        (["emulator.chunk=6KiB"], "emulator.chunk: must be between 4KiB and 4MiB"),
        (["emulator.chunk=8MiB"], "emulator.chunk: must be between 4KiB and 4MiB"),
        (["emulator.duration-limit=-1"], "emulator.duration-limit: must be between 0 and 3600s"),
        (["migration.max-bandwidth=0"], "migration.max-bandwidth: must be > 0"),
        (["migration.max-postcopy-bandwidth=-1"], "migration.max-postcopy-bandwidth: must be"),
        (["migration.downtime-limit=-1"], "migration.downtime-limit: must be between 0 and 2000s"),
        (
            ["migration.switchover-after=-1s"],
            "migration.switchover-after: must be between 0 and 3600s",
        ),
        (
            ["guest.ram=lots"],
            "guest.ram: expected a size like 4KiB, 2MiB, 64MiB or 1.25GB, got 'lots'",
        ),
        (["link.bandwidth=fast"], "link.bandwidth: expected a rate like 10Gbit/s"),
        (["link.rtt=2m"], "link.rtt: expected a duration like 200us"),
    ],
)
def test_validation_errors(sets, message):
    text = error_of(sets)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["link.bandwith=1"], "unknown key 'link.bandwith' (did you mean link.bandwidth?)"),
        (["linc.bandwidth=1"], "unknown section 'linc' (did you mean link.bandwidth?)"),
        (["link.ram=1"], "unknown key 'link.ram' (did you mean guest.ram?)"),
        (["migration.preempt=1"], "(did you mean migration.postcopy-preempt?)"),
        (["guest.page_size=4K"], "(did you mean guest.page-size?)"),
        (["link.foo=1"], "unknown key 'link.foo' (keys: link.bandwidth, link.rtt,"),
        (["foo.bar=1"], "unknown section 'foo' (sections: migration, link, guest,"),
        (["faults.x=1"], "unknown key 'faults.x'"),
        (["link.bandwidth"], "--set 'link.bandwidth': expected section.key=value"),
        (["seed=1"], "--set 'seed=1': expected section.key=value"),
    ],
)
def test_unknown_names(sets, message):
    assert message in error_of(sets)


def test_unknown_names_in_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'seed' \(did you mean emulator.seed\?\)"):
        load_config(write(tmp_path, "seed = 3\n"))
    with pytest.raises(ConfigError, match=r"unknown section 'lnk' \(did you mean link.rtt\?\)"):
        load_config(write(tmp_path, "[lnk]\nrtt = 0\n"))
    with pytest.raises(ConfigError, match=r"link: must be a table"):
        load_config(write(tmp_path, "link = 3\n"))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[guest]\nvcpus = true\n", "guest.vcpus: must be a whole number (got true)"),
        ("[guest]\nvcpus = 1.5\n", "guest.vcpus: must be a whole number (got 1.5)"),
        ("[guest]\nram = true\n", "guest.ram: expected a size"),
        ("[link]\nbandwidth = false\n", "link.bandwidth: expected a rate"),
        ("[workload]\nhot-fraction = true\n", "workload.hot-fraction: must be a number"),
        ("[workload]\npattern = 3\n", "workload.pattern: must be a string (got 3)"),
        ("[emulator]\npayload = 2\n", "emulator.payload: must be true or false (got 2)"),
    ],
)
def test_toml_types(tmp_path, toml, message):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:2: {message}")  # the file and the line


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[link\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid TOML")):
        load_config(path)


def test_faults_are_stored_raw(tmp_path):
    path = write(
        tmp_path,
        '[[faults]]\nat = "2s"\nwhat = "cut"\nchannel = "main"\n\n[[faults]]\nat = 3\n',
    )
    cfg = load_config(path)
    assert cfg["faults"] == [{"at": "2s", "what": "cut", "channel": "main"}, {"at": 3}]
    cfg["faults"][0]["at"] = "9s"  # a copy: the config stays as loaded
    assert cfg["faults"][0]["at"] == "2s"
    assert cfg.with_overrides(["guest.vcpus=2"])["faults"] == cfg["faults"]


@pytest.mark.parametrize("toml", ["faults = 3\n", "[faults]\nat = 1\n", "faults = [1, 2]\n"])
def test_faults_must_be_an_array_of_tables(tmp_path, toml):
    with pytest.raises(ConfigError, match="faults: must be an array of tables"):
        load_config(write(tmp_path, toml))


def test_config_is_immutable():
    cfg = load_config()
    with pytest.raises(TypeError):
        cfg["guest.vcpus"] = 2  # type: ignore[index]
    with pytest.raises(KeyError, match="did you mean guest.vcpus"):
        cfg["guest.vcpu"]


def test_config_from_a_mapping():
    assert Config() == load_config()
    assert Config({"guest.vcpus": 2, "link.rtt": "1ms"})["link.rtt"] == 0.001


def test_to_json():
    cfg = load_config(None, ["guest.page-size=2MiB", "link.bandwidth=10Gbit"])
    data = cfg.to_json()
    assert list(data) == [*SECTIONS, "faults"]
    assert data["migration"]["postcopy-ram"] is True
    assert data["guest"]["page-size"] == 2 * MiB
    assert data["link"]["bandwidth"] == 1.25e9
    assert data["faults"] == []
    assert json.loads(json.dumps(data)) == data
    flat = {f"{s}.{k}": v for s, table in data.items() if s != "faults" for k, v in table.items()}
    assert Config(flat) == cfg


def test_preset_by_name():
    assert "default" in scenario_names()
    assert load_config("default") == load_config()


def test_preset_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SCENARIO_DIR", tmp_path)
    write(tmp_path, "[guest]\nvcpus = 2\n", "two.toml")
    write(tmp_path, "", "empty.toml")
    assert scenario_names() == ["empty", "two"]
    assert load_config("two")["guest.vcpus"] == 2
    with pytest.raises(ConfigError) as err:
        load_config("three")
    assert str(err.value) == (
        f"scenario file not found: {tmp_path / 'three.toml'} (presets: empty, two)"
    )


def test_existing_file_beats_preset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[guest]\nvcpus = 3\n", "default")
    assert load_config("default")["guest.vcpus"] == 3


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"scenario file not found: {path} (presets:")):
        load_config(path)


def test_default_preset_lists_every_key():
    import tomllib

    text = (REPO / "assets" / "scenarios" / "default.toml").read_text()
    data = tomllib.loads(text)
    names = {f"{s}.{k}" for s, table in data.items() for k in table}
    # a property some designs do not have is listed commented out (setting it there is refused)
    assert "# x-postcopy-preempt-break-huge = true" in text
    assert names | {"migration.x-postcopy-preempt-break-huge"} == set(KEYS)


def docs_rows() -> dict[str, list[str]]:
    """{"section.key": [type, default, allowed, meaning]} from the tables in docs/config.md."""
    rows, section = {}, None
    for line in (REPO / "docs" / "config.md").read_text().splitlines():
        heading = re.fullmatch(r"## \[(\w+)\]", line)
        if heading:
            section = heading.group(1)
        elif section and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[f"{section}.{cells[0].strip('`')}"] = cells[1:]
    return rows


def test_docs_match_keys():
    rows = docs_rows()
    assert list(rows) == list(KEYS)
    for name, key in KEYS.items():
        kind, default, allowed, meaning = rows[name]
        assert kind == key.kind, name
        assert default.strip("`") == key.show(key.default), name
        assert allowed.startswith(key.allowed()), name
        assert meaning, name
