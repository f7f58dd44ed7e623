"""The settings are listed once, in `app.settings.Settings`; the rest is held against it.

The command line's flags are made from the fields, so they are checked for what they add
(a flag each, help that names the variable). The README's table is written by hand, since
it says more than a field's description, so its names and defaults are checked here: a
setting added without a row, or a default changed in the code alone, fails a test.
"""

from __future__ import annotations

import os
import re
from itertools import takewhile
from pathlib import Path
from typing import get_origin

import pytest
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo

from app.__main__ import build_settings, flag_name, main, parse_args
from app.settings import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_HEADER = "| variable | default | meaning |"

DOCUMENTED = {f"{ENV_PREFIX}{name.upper()}": field for name, field in Settings.model_fields.items()}


def readme_defaults(text: str) -> dict[str, str]:
    """``{variable: default}`` from the settings table in ``text``, the default unquoted.

    A row must name one variable, and only once: a row for two would hide the second from
    the comparison of defaults.
    """
    lines = text.splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the |---| line
    defaults: dict[str, str] = {}
    for line in takewhile(lambda line: line.startswith("|"), lines[start:]):
        name, default, _ = (cell.strip() for cell in line[1:].split("|", 2))
        assert re.fullmatch(r"`WORDRNN_[A-Z0-9_]+`", name), f"not one variable: {line}"
        name = name.strip("`")
        assert name not in defaults, f"{name} has two rows"
        defaults[name] = default.strip("`")
    return defaults


def readme_value(default: str, field: FieldInfo) -> object:
    """The README's default as the setting's value, read as the same text in the environment.

    So 5 and 5.0 are one float, and "false" a bool. "none" is an unset setting (an empty
    list, for a list), "empty" the empty string.
    """
    if default == "none":
        return [] if get_origin(field.annotation) is list else None
    if default == "empty":
        return ""
    return TypeAdapter(field.annotation).validate_strings(default)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_the_readme_lists_every_setting_and_nothing_else() -> None:
    listed = set(readme_defaults(README.read_text(encoding="utf-8")))
    assert sorted(listed - set(DOCUMENTED)) == [], "rows without a setting"
    assert sorted(set(DOCUMENTED) - listed) == [], "settings without a row"


@pytest.mark.parametrize("variable", sorted(DOCUMENTED))
def test_the_readme_gives_the_default_of_the_code(variable: str) -> None:
    field = DOCUMENTED[variable]
    default = readme_defaults(README.read_text(encoding="utf-8")).get(variable)
    if default is None:
        pytest.skip("no row: test_the_readme_lists_every_setting_and_nothing_else fails")
    assert readme_value(default, field) == field.get_default(call_default_factory=True)


@pytest.mark.parametrize(
    ("default", "field", "expected"),
    [
        ("5", FieldInfo(annotation=float), 5.0),
        ("127.0.0.1,::1", FieldInfo(annotation=str), "127.0.0.1,::1"),
        ("none", FieldInfo(annotation=Path | None), None),
        ("none", FieldInfo(annotation=list[str]), []),
        ("empty", FieldInfo(annotation=str), ""),
        ("false", FieldInfo(annotation=bool), False),
    ],
)
def test_a_readme_default_is_read_as_the_environment_would(
    default: str, field: FieldInfo, expected: object
) -> None:
    assert readme_value(default, field) == expected


def test_every_setting_says_what_it_is_for() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_every_setting_has_a_flag_that_help_lists_with_its_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert set(vars(parse_args([]))) == set(Settings.model_fields)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for variable, name in ((v, v.removeprefix(ENV_PREFIX).lower()) for v in DOCUMENTED):
        assert f"{flag_name(name)} " in help_text
        assert f"[{variable}" in help_text
    # As the README writes them: 5 seconds, not 5.0.
    assert "[WORDRNN_RELOAD_INTERVAL_SECONDS; default: 5]" in help_text


@pytest.mark.usefixtures("clean_env")
def test_a_setting_once_only_in_the_environment_takes_a_flag() -> None:
    args = parse_args(
        [
            "--model-dir",
            "r",
            "--max-pending",
            "3",
            "--request-timeout-seconds",
            "1.5",
            "--cors-origins",
            "https://a.example, https://b.example",
        ]
    )
    settings = build_settings(args)
    assert settings.max_pending == 3
    assert settings.request_timeout_seconds == 1.5
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.usefixtures("clean_env")
def test_a_bad_flag_value_names_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--model-dir", "r", "--max-batch", "0", "--port", "eighty"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: setting port (--port or WORDRNN_PORT): ")
    assert err[1].startswith("error: setting max_batch (--max-batch or WORDRNN_MAX_BATCH): ")
