"""One declaration per configuration key: the CLI, validation, candidates and the resume rule derive from it."""

import math
import re
from dataclasses import fields

import pytest
from torch import nn

from fedsms import FedSMSError
from fedsms.cli import build_parser, config_overrides
from fedsms.config import FederationConfig, RunConfig, soup_shaping_changes, split_config
from fedsms.recipe import CandidateConfig, expand_recipe, parse_grid
from fedsms.schema import FALSE_WORDS, TRUE_WORDS, Key, declared, parse_bool
from fedsms.training import make_optimizer

ALL_KEYS = [(cls, f, spec) for cls in (RunConfig, FederationConfig) for f, spec in declared(cls)]
PYTHON_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def subparser(name):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]


def test_every_field_is_a_declared_key_with_help_type_and_a_valid_default():
    for cls in (RunConfig, FederationConfig):
        assert [f.name for f in fields(cls)] == [f.name for f, _ in declared(cls)]
    names = [f.name for _, f, _ in ALL_KEYS]
    assert len(names) == len(set(names))  # the two groups share one namespace
    for _, f, spec in ALL_KEYS:
        assert isinstance(spec, Key) and len(spec.help.split()) >= 3, f.name
        assert f.type in PYTHON_TYPES and type(f.default) is PYTHON_TYPES[f.type], f.name
        assert spec.allows(f.default), f.name
        assert not spec.choices or f.type == "str", f.name


def test_every_size_has_a_bound_stated_in_its_error():
    for cls, f, _spec in ALL_KEYS:
        if f.type == "int":
            with pytest.raises(FedSMSError, match=f"'{f.name.replace('_', '-')}' must be"):
                cls.from_mapping({f.name: 10**12})


def test_defaults_agree_and_lr_is_one_number():
    run = RunConfig()
    assert run.lr == CandidateConfig().lr == 0.05
    assert run.base_candidate() == CandidateConfig(seed=run.seed)
    candidate_keys = {spec.candidate for _, _, spec in ALL_KEYS if spec.candidate}
    assert {f.name for f in fields(CandidateConfig)} == candidate_keys
    assert set(FederationConfig().to_dict()) == {f.name for f in fields(FederationConfig)}


@pytest.mark.parametrize("command, groups", [("local", (RunConfig,)), ("simulate", (RunConfig, FederationConfig))])
def test_every_key_has_a_flag_whose_help_is_its_declaration(command, groups):
    sub = subparser(command)
    flags = {a.dest: a for a in sub._actions}
    help_text = re.sub(r"\s", "", sub.format_help())  # argparse wraps lines, also at hyphens
    for cls in groups:
        for f, spec in declared(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in flags[f.name].option_strings
            assert spec.help in " ".join(flags[f.name].help.split()), f.name
            assert re.sub(r"\s", "", spec.help) in help_text, f.name
    assert ("mode" in flags) == (FederationConfig in groups)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", "nan", "'lr' must be a finite float, got 'nan'"),
        ("lr", math.inf, "'lr' must be a finite float"),
        ("weight-decay", "-inf", "'weight-decay' must be a finite float"),
        ("round-timeout", "inf", "'round-timeout' must be a finite float"),
        ("momentum", "nan", "'momentum' must be a finite float"),
        ("momentum", 1.0, "'momentum' must be in [0, 1), got 1.0"),
        ("momentum", -0.1, "'momentum' must be in [0, 1)"),
        ("phases", 10**9, "'phases' must be at least 1 and at most 100, got 1000000000"),
        ("phases", 101, "'phases' must be at least 1 and at most 100"),
        ("candidates", 10**9, "'candidates' must be at least 1 and at most 1024"),
        ("candidates", 1025, "'candidates' must be at least 1 and at most 1024"),
        ("retrain-epochs", 10_001, "'retrain-epochs' must be at least 1 and at most 10000"),
        ("pretrain-epochs", 10_001, "'pretrain-epochs' must be at least 0 and at most 10000"),
        ("batch-size", 2**20 + 1, "'batch-size' must be at least 1 and at most 1048576"),
        ("ood-examples", 10**7 + 1, "'ood-examples' must be at least 1 and at most 10000000"),
        ("seed", -1, "'seed' must be at least 0"),
        ("rounds-per-phase", 10**9, "'rounds-per-phase' must be at least 1 and at most 10000"),
        ("pretrain-rounds", 10**9, "'pretrain-rounds' must be at least 0 and at most 10000"),
        ("recipe", "momentum=0.5,1.5", "recipe value 'momentum' must be in [0, 1), got 1.5"),
        ("recipe", "lr=0.1,nan", "recipe value 'lr' must be a finite float"),
        ("recipe", "batch_size=32,1000000000", "recipe value 'batch_size' must be at least 1 and at most 1048576"),
        ("recipe", "epochs=0", "recipe value 'epochs' must be at least 1"),
    ],
)
def test_bad_and_absurd_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(FedSMSError, match=re.escape(message)):
        split_config({key: value})


@pytest.mark.parametrize(
    "key, value",
    [
        ("phases", 100),
        ("candidates", 1024),
        ("batch-size", 2**20),
        ("ood-examples", 10**7),
        ("momentum", 0.0),
        ("momentum", 0.99),
        ("retrain-epochs", 10_000),
        ("seed", 2**32 - 1),
    ],
)
def test_values_on_the_bounds_are_accepted(key, value):
    run, _ = split_config({key: value})
    assert run.to_dict()[key.replace("-", "_")] == value


@pytest.mark.parametrize("word", TRUE_WORDS + FALSE_WORDS)
def test_one_boolean_parser_for_config_and_recipe(word):
    expected = word in TRUE_WORDS
    assert set(TRUE_WORDS) == {"true", "1", "yes", "on"} and set(FALSE_WORDS) == {"false", "0", "no", "off"}
    for spelling in (word, word.upper(), f" {word.capitalize()} "):
        assert parse_bool(spelling) is expected
        assert RunConfig.from_mapping({"augment": spelling}).augment is expected
        assert FederationConfig.from_mapping({"resume": spelling}).resume is expected
        assert expand_recipe(f"augment={word}", 1, CandidateConfig())[0].augment is expected


@pytest.mark.parametrize("word", ["maybe", "", "2", "enabled"])
def test_the_boolean_parser_refuses_other_words(word):
    with pytest.raises(ValueError):
        parse_bool(word)
    with pytest.raises(FedSMSError, match="'ood' must be a bool"):
        split_config({"ood": word})
    with pytest.raises(FedSMSError, match="recipe value 'augment' must be a bool"):
        parse_grid(f"augment={word or 'x'}")


def test_momentum_flag_reaches_the_candidates_and_the_optimizer():
    args = build_parser().parse_args(["local", "--momentum", "0.5"])
    run = RunConfig.from_mapping(config_overrides(args, RunConfig()))
    assert run.momentum == 0.5 and {c.momentum for c in run.candidate_configs()} == {0.5}
    assert run.pretrain_candidate().momentum == 0.5
    optimizer = make_optimizer(nn.Linear(2, 2), run.candidate_configs()[0])
    assert optimizer.defaults["momentum"] == 0.5

    args = build_parser().parse_args(["simulate", "--momentum", "0.5", "--mode", "data"])
    run, fed = split_config(config_overrides(args, RunConfig()) | config_overrides(args, FederationConfig()))
    assert run.base_candidate().momentum == 0.5 and fed.mode == "data"
    sent = run.candidate_configs()[1].to_dict()  # what the server puts in a train message
    assert CandidateConfig.from_dict(sent).momentum == 0.5


def test_momentum_in_a_recipe_and_the_flower_run_config():
    run, _ = split_config({"momentum": "0.7", "candidates": 4, "recipe": "momentum=0.8,0.9"})
    assert [c.momentum for c in run.candidate_configs()] == [0.8, 0.9, 0.8, 0.9]
    assert [c.seed for c in run.candidate_configs()] == [0, 1, 2, 3]


def test_a_huge_recipe_grid_is_never_listed():
    grid = ";".join(
        f"{k}=" + ",".join(str(v) for v in values)
        for k, values in {
            "seed": range(1000),
            "lr": [0.01 * i for i in range(1, 1001)],
            "momentum": [0.001 * i for i in range(999)],
            "weight_decay": [1e-5 * i for i in range(1000)],
        }.items()
    )  # 10**12 points
    configs = expand_recipe(grid, 3, CandidateConfig())
    assert [(c.seed, c.lr, c.momentum, c.weight_decay) for c in configs] == [
        (0, 0.01, 0.0, 0.0),
        (0, 0.01, 0.0, 1e-5),
        (0, 0.01, 0.0, 2e-5),
    ]


def test_soup_shaping_changes_names_soup_keys_and_ignores_where_things_live():
    saved = {**RunConfig().to_dict(), **FederationConfig().to_dict()}
    same_soup = {**saved, "out_dir": "elsewhere", "device": "cuda", "workers": 4, "round_timeout": 5.0, "resume": True}
    assert soup_shaping_changes(saved, same_soup) == []
    changed = {**same_soup, "momentum": 0.5, "value_dtype": "bf16"}
    assert soup_shaping_changes(saved, changed) == ["momentum", "value_dtype"]
    hyphenated = {k.replace("_", "-"): v for k, v in saved.items()}
    assert soup_shaping_changes(hyphenated, changed) == ["momentum", "value_dtype"]
    older = {k: v for k, v in saved.items() if k != "momentum"}  # written before the key existed
    assert soup_shaping_changes(older, same_soup) == []
    assert soup_shaping_changes(older, changed) == ["momentum", "value_dtype"]
    shaping = {f.name for _, f, spec in ALL_KEYS if spec.shapes_soup}
    assert "out_dir" not in shaping and {"lr", "momentum", "seed", "recipe", "mode"} <= shaping
