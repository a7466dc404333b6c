"""The config loader and its documentation."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from hevisum.config import RunConfig, dumps_toml, from_dict, load_config, load_run_config
from hevisum.errors import HevisumError

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _keys(obj, prefix=""):
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            yield from _keys(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


def test_every_config_key_is_documented_with_its_default():
    doc = DOC.read_text()
    sections = doc.split("\n## ")
    for key, default in _keys(RunConfig()):
        section, _, name = key.rpartition(".")
        text = next((s for s in sections if s.startswith(f"`[{section}]`")), None) if section else sections[1]
        assert text is not None, f"docs/config.md has no section [{section}]"
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/config.md does not document {key}"
        if not isinstance(default, (list, dict)):
            shown = dumps_toml_value(default)
            assert f"`{shown}`" in row, f"{key}: default {shown} not in docs row {row!r}"


def dumps_toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(None, profile="reference", seed=4)
    p = tmp_path / "c.toml"
    p.write_text(dumps_toml(cfg))
    assert load_run_config(p) == cfg


@pytest.mark.parametrize("text,words", [
    ("[train]\nepocs = 3\n", "train.epocs"),
    ("[train]\nepochs = 'x'\n", "train.epochs"),
    ("profile = 'slow'\n", "slow"),
    ("[tiles]\nsize = 80\n", "multiple of 3"),
])
def test_bad_config_names_the_key(tmp_path, text, words):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(HevisumError, match=words.replace(".", r"\.")):
        load_run_config(p)


def test_an_unknown_method_is_refused_before_any_work_naming_the_valid_ones():
    from hevisum.pipeline import resolve_methods

    cfg = from_dict(RunConfig, {"models": {"methods": ["nope"]}})
    with pytest.raises(HevisumError, match="nope.*encoder-ridge"):
        resolve_methods(cfg)
    assert resolve_methods(RunConfig())[:2] == ["mean", "colour-ridge"]  # baselines always run


def test_realign_min_margin_default_is_the_realign_functions_and_is_checked(tmp_path):
    from hevisum.config import RunConfig
    from hevisum.preprocess.spots import MIN_MARGIN

    assert RunConfig().realign.min_margin == MIN_MARGIN
    p = tmp_path / "c.toml"
    p.write_text("[realign]\nmin_margin = 3\n")
    with pytest.raises(HevisumError, match=r"realign.min_margin must be"):
        load_config(RunConfig, p)
