"""A setting is written once (the thin-API issue): its field carries its default, help, check and
flag, and the YAML key, the check, the ``robalign train`` flag and the docs' table row all come
from it — a field added here appears in all four; ``docs/settings.md`` is the generator's output."""

import dataclasses
from pathlib import Path

import pytest

from robalign.app.training import settings as S
from robalign.app.commands.cli import build_parser
from robalign.app.training.config import (EMBEDDED_DEFAULTS, MODEL_DEFAULTS, TrainSettings, load_settings,
                                 settings_markdown)

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_is_a_setting_and_the_docs_table_is_current():
    assert all("check" in f.metadata for f in dataclasses.fields(TrainSettings))
    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == settings_markdown(), \
        "docs/settings.md is stale: run `make settings-table`"


def test_a_field_added_appears_as_yaml_key_check_flag_and_table_row(tmp_path):
    Extended = dataclasses.make_dataclass("Extended", [
        ("zeta", float, S.setting(0.5, "a setting of this test", S.POSITIVE)),
        ("gamma_off", bool, S.setting(True, "a switch of this test", S.FLAG, flag="--no-gamma", negated=True))],
        bases=(TrainSettings,))
    parser = __import__("argparse").ArgumentParser()
    S.add_flags(parser, Extended, {"objective": str, "objective_hparam": str, "json": dict},
                MODEL_DEFAULTS, EMBEDDED_DEFAULTS)
    assert S.overrides(parser.parse_args(["--zeta", "2", "--no-gamma"]), Extended) == {"zeta": 2.0, "gamma_off": False}
    assert S.overrides(parser.parse_args([]), Extended) == {}
    config = tmp_path / "run.yaml"
    config.write_text("zeta: 3.5\n")
    assert load_settings(config, cls=Extended).zeta == 3.5                       # the YAML key
    with pytest.raises(ValueError, match=r"run.yaml: `zeta` must be a finite number > 0, got -1"):
        config.write_text("zeta: -1\n")
        load_settings(config, cls=Extended)                                      # the check, once
    table = settings_markdown(Extended)
    assert "| `zeta` | `--zeta` | 0.5 | a finite number > 0 | a setting of this test |" in table
    assert "| `gamma_off` | `--no-gamma` | on | true or false | a switch of this test |" in table


def test_the_train_parser_is_generated_from_the_fields():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    assert {f.name: S.flag_of(f) for f in dataclasses.fields(TrainSettings)}.items() <= flags.items()
