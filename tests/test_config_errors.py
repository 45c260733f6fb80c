"""A scenario that can not run stops with one short line and exit 2, whatever is wrong in it."""

import re

import pytest

from emu import cli, faults
from emu.config import ConfigError, load_config

HUGE = "x" * 5_000_000


def run_cli(capsys, *argv: str) -> str:
    """postcopy-emu run ARGV, stopped before any process starts: its one line on stderr."""
    assert cli.main(["run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err[:500]
    assert err.startswith("postcopy-emu: ")
    return err.strip()


def write(tmp_path, data: str | bytes, name: str = "scenario.toml"):
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def test_arrays_nested_too_deeply(tmp_path, capsys):
    path = write(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n")
    assert run_cli(capsys, str(path)) == \
        f"postcopy-emu: {path}: invalid TOML: arrays or tables nested too deeply"


def test_a_deep_array_where_a_value_goes(tmp_path, capsys):
    path = write(tmp_path, "[emulator]\npayload = " + "[" * 300 + "]" * 300 + "\n")
    line = run_cli(capsys, str(path))
    assert line.startswith(f"postcopy-emu: {path}:2: emulator.payload: must be true or false")
    assert len(line) < 200


def test_a_file_that_is_not_utf8(tmp_path, capsys):
    path = write(tmp_path, b'[guest]\nram = "\xff\xfe"\n')
    assert run_cli(capsys, str(path)) == (f"postcopy-emu: {path}: invalid TOML: not UTF-8 text, "
                                          "byte 0xff (at line 2, column 8)")


def test_a_number_too_long_for_python(tmp_path, capsys):
    path = write(tmp_path, "[guest]\nvcpus = " + "9" * 5000 + "\n")
    assert run_cli(capsys, str(path)) == \
        f"postcopy-emu: {path}: invalid TOML: a number of more than 4300 digits"


def test_a_toml_typo_names_the_file_and_the_line(tmp_path, capsys):
    path = write(tmp_path, "[guest]\nram = 32MiB\n")
    line = run_cli(capsys, str(path))
    assert line.startswith(f"postcopy-emu: {path}: invalid TOML: ")
    assert line.endswith("(at line 2, column 9)")


@pytest.mark.parametrize(("toml", "message"), [
    ('[link]\nrtt = "200us"\nbandwith = "1Gbit"\n',
     ":3: unknown key 'link.bandwith' (did you mean link.bandwidth?)"),
    ('# a comment\n[guest]\nvcpus = 2\nram = "32 MeB"\n', ":4: guest.ram: expected a size"),
    ('link.rtt = "1 parsec"\n', ":1: link.rtt: expected a duration"),
    ("\n\nlink = 3\n", ":3: link: must be a table"),
    ('[guest]\n"ram" = "x"\n', ":2: guest.ram: expected a size"),
])
def test_a_bad_setting_in_a_file_names_the_file_and_the_line(tmp_path, toml, message):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}{message}"), str(err.value)


def test_a_bad_override_is_the_command_line_s_not_the_file_s(tmp_path):
    path = write(tmp_path, '[guest]\nram = "32 MeB"\n')
    assert load_config(path, ["guest.ram=64MiB"])["guest.ram"] == 64 << 20  # the file's is gone
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[guest]\nram = "32MiB"\n', "good.toml"), ["guest.ram=1x"])
    assert str(err.value).startswith("guest.ram: expected a size")


@pytest.mark.parametrize("argv", [
    ["--set", f"guest.ram={HUGE}"],
    ["--set", f"workload.pattern={HUGE}"],
    ["--set", f"emulator.payload={HUGE}"],
    ["--set", f"guest.vcpus={HUGE}"],
    ["--set", f"guest.{HUGE}=1"],
    ["--set", HUGE],
    ["--fault", f"cut {HUGE} at 1s"],
    ["--fault", HUGE],
    ["--recover-after", HUGE],
])
def test_an_echoed_value_is_cut_and_its_length_said(capsys, argv):
    line = run_cli(capsys, *argv)
    assert len(line) < 300, line[:300]
    assert re.search(r"x{40}'\.\.\. \(500000\d characters\)", line), line


def test_a_huge_value_in_a_file_is_cut_too(tmp_path, capsys):
    path = write(tmp_path, f'[guest]\nram = "{HUGE}"\n')
    line = run_cli(capsys, str(path))
    assert line.startswith(f"postcopy-emu: {path}:2: guest.ram: expected a size")
    assert line.endswith("'... (5000000 characters)") and len(line) < 300


@pytest.mark.parametrize("text", ["cut return-path at 10ms", "cut return path at 10ms",
                                  "cut return at 10ms"])
def test_the_return_path_by_qemu_s_name(text):
    assert faults.parse(text) == faults.Fault(0.01, "cut", "return")


@pytest.mark.parametrize("channel", ["return-path", "return path"])
def test_the_return_path_by_qemu_s_name_in_a_scenario(tmp_path, channel):
    path = write(tmp_path, f'[[faults]]\nat = "10ms"\naction = "cut"\nchannel = "{channel}"\n')
    assert faults.from_config(load_config(path)) == [faults.Fault(0.01, "cut", "return")]


def test_a_wrong_channel_says_which_words_there_are(capsys):
    line = run_cli(capsys, "--fault", "cut returns at 10ms")
    assert line == ("postcopy-emu: --fault 'cut returns at 10ms': channel must be one of main, "
                    "preempt, return (or return path) (got 'returns')")


def test_version_and_help_point_to_the_keys(capsys):
    from emu import cli
    with pytest.raises(SystemExit) as end:
        cli.main(["--version"])
    assert end.value.code == 0 and capsys.readouterr().out.startswith("postcopy-emu ")
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "docs/config.md" in capsys.readouterr().out


def test_a_long_run_says_beforehand_how_long_it_takes():
    from emu import cli
    from tests.conftest import config
    quick = config()
    assert cli._real_seconds(quick, 0.0) < cli.LONG_RUN_S
    long = config(guest__ram="20GiB", emulator__time_scale="0.02", emulator__payload="false")
    # 20 GiB at 1 Gbit/s is 172 s emulated, 8590 s real at 0.02; halfway, half of the rest
    assert cli._real_seconds(long, 0.0) == pytest.approx((20 * 2**30 / 125e6 + 0.1) / 0.02)
    assert cli._real_seconds(long, 0.5) == pytest.approx(20 * 2**30 / 125e6 / 2 / 0.02)
