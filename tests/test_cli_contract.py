"""The command line against the configuration (issue 17, item 3): every TrainConfig field is a ``brainseg train``
flag or fixed by the protocol, every flag reaches its field, the defaults are the dataclass's, and the choices
come from the value lists in ``config``."""

from __future__ import annotations

from dataclasses import fields

import pytest

from brainseg import cli
from brainseg.config import ARCHITECTURES, NORMALIZATIONS, PRECISIONS, SEQUENCES, ExperimentConfig, TrainConfig


def _train_config(monkeypatch, tmp_path, *argv: str) -> ExperimentConfig:
    """The ExperimentConfig ``brainseg train ARGV`` hands to the trainer (training itself stubbed out)."""
    import brainseg.pipeline

    seen = {}
    monkeypatch.setattr(cli, "cache_matches", lambda *a: True)
    monkeypatch.setattr(brainseg.pipeline, "train_models", lambda names, cache, out, cfg, **kw: seen.setdefault("cfg", cfg) and None)
    assert cli.main(["train", "--data", str(tmp_path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), *argv]) == 0
    return seen["cfg"]


def test_every_train_field_is_a_flag_or_fixed():
    names = {f.name for f in fields(TrainConfig)}
    assert set(cli.TRAIN_FLAGS) | set(cli.TRAIN_FIELDS_FIXED) == names
    assert not set(cli.TRAIN_FLAGS) & set(cli.TRAIN_FIELDS_FIXED)


def test_the_defaults_are_the_dataclass_defaults(monkeypatch, tmp_path):
    cfg = _train_config(monkeypatch, tmp_path)
    assert cfg.train == TrainConfig()


def test_each_flag_reaches_its_field(monkeypatch, tmp_path):
    d = TrainConfig()
    argv, want = [], {}
    for name, (dest, scale, _) in cli.TRAIN_FLAGS.items():
        value = getattr(d, name)
        new = value + 3 if isinstance(value, int) else value + 0.25 * scale  # another value of the flag's type
        argv += [f"--{dest.replace('_', '-')}", str(new if scale == 1 else new / scale)]
        want[name] = new
    cfg = _train_config(monkeypatch, tmp_path, *argv)
    for name, value in want.items():
        assert getattr(cfg.train, name) == pytest.approx(value), name


def test_choices_come_from_the_value_lists():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    option = {a.dest: a for a in sub["train"]._actions}
    assert list(option["model"].choices) == [*ARCHITECTURES, "all"] and tuple(option["normalization"].choices) == NORMALIZATIONS
    option = {a.dest: a for a in sub["predict"]._actions}
    assert tuple(option["precision"].choices) == PRECISIONS and tuple(option["sequence"].choices) == tuple(SEQUENCES)


def test_the_architectures_are_the_networks():
    from brainseg.models import MODELS

    assert tuple(MODELS) == ARCHITECTURES


def test_every_command_runs_under_the_servers_allocator_setting(monkeypatch, capsys):
    """Training and evaluation keep freed buffers as the server does (``BRAINSEG_MALLOC_KEEP_MB``); a
    value that is not a number is a one-line error, not a traceback."""
    from brainseg.serving import allocator

    seen = []
    monkeypatch.setattr(allocator, "keep_freed", lambda mib: seen.append(mib) or True)
    monkeypatch.setattr(cli, "cmd_stats", lambda args: 0)
    monkeypatch.delenv("BRAINSEG_MALLOC_KEEP_MB", raising=False)
    assert cli.main(["data", "stats", "somewhere"]) == 0
    assert seen == [256]
    for value, want in ((None, 256), ("64", 64), ("0", 0)):
        if value is None:
            monkeypatch.delenv("BRAINSEG_MALLOC_KEEP_MB", raising=False)
        else:
            monkeypatch.setenv("BRAINSEG_MALLOC_KEEP_MB", value)
        cli._keep_freed()
        assert seen[-1] == want
    monkeypatch.setenv("BRAINSEG_MALLOC_KEEP_MB", "lots")
    with pytest.raises(SystemExit, match="BRAINSEG_MALLOC_KEEP_MB must be a whole number"):
        cli._keep_freed()
