"""Memory before allocation: a run that does not fit stops before anything exists, with one
line; an allocation that fails says so and leaves nothing (never SIGBUS); every quantity in
the configuration has an upper bound."""

import pytest

from emu.config import KEYS, ConfigError, load_config

QUANTITIES = [name for name, key in KEYS.items()
              if key.kind in ("size", "rate", "duration", "int", "float") and not key.choices]


def test_every_quantity_has_an_upper_bound():
    assert [name for name in QUANTITIES if KEYS[name].high is None] == []


@pytest.mark.parametrize("name, value", [
    (name, value) for name in QUANTITIES for value in ("1e30", "1e400", "1e9999999")
    if KEYS[name].kind in ("size", "rate", "duration") or value == "1e30"])
def test_a_huge_value_names_the_key_and_its_range(name, value):
    if KEYS[name].kind == "int":
        value = str(10**30)  # "1e30" is not a whole number, which it says
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{name}={value}"])
    text = str(err.value)
    assert text.startswith(f"{name}: must be {KEYS[name].allowed()}"), text
    assert "\n" not in text
