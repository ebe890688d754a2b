import argparse

import pytest

from fastfat.cli.flags import add_dataclass_flags, given
from fastfat.config import EvalConfig, TrainConfig, make_eval_config, make_train_config
from fastfat.config_dict import from_dict, to_dict
from fastfat.config_values import canonical_attack, parse_eps, resolve_step
from fastfat.errors import UserError


def test_parse_eps_fractions_and_numbers():
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps(" 16 / 255 ") == 16 / 255
    assert parse_eps("0.25") == 0.25
    assert parse_eps(0.1) == 0.1
    for bad in ("eight", "1/0", "", True):
        with pytest.raises(UserError):
            parse_eps(bad)


def test_resolve_step():
    assert resolve_step("eps/10", 0.1) == pytest.approx(0.01)
    assert resolve_step("eps/4", 16 / 255) == pytest.approx(4 / 255)
    assert resolve_step("2*eps", 0.1) == pytest.approx(0.2)
    assert resolve_step("0.007", 0.5) == 0.007
    assert resolve_step("2/255", 0.5) == 2 / 255


def test_canonical_attack_names():
    assert canonical_attack("PGD-20") == "pgd20"
    assert canonical_attack("pgd7") == "pgd7"
    assert canonical_attack("C&W") == "cw"
    assert canonical_attack("cw-inf") == "cw"
    assert canonical_attack("FGSM") == "fgsm"
    assert canonical_attack("AutoAttack") == canonical_attack("AA") == "aa"
    assert canonical_attack("APGD") == "apgd"
    for bad in ("deepfool", "apgd20", "pgd", "aa1"):
        with pytest.raises(UserError):
            canonical_attack(bad)


def test_presets_then_overrides():
    cfg = make_train_config("paper")
    assert (cfg.steps, cfg.step_size, cfg.schedule, cfg.epochs) == (20, "eps/10", "paper", 120)
    assert cfg.alpha() == pytest.approx(cfg.eps_train / 10)
    cfg = make_train_config("authors", eps_train="16/255")
    assert cfg.alpha() == 0.007 and cfg.batch_size == 256 and cfg.vcar_mode == "authors"
    assert cfg.eps_train == 16 / 255
    cfg = make_train_config("demo", epochs=3)
    assert cfg.dataset == "digits" and cfg.epochs == 3 and cfg.preset == "demo"
    assert make_eval_config("demo").eps_test == [0.15, 0.25]
    assert make_eval_config(None).eps_test == [16 / 255, 20 / 255]


def test_model_alias_is_canonicalised():
    assert make_train_config(model="WRN-34-10").model == "wrn-32-10"


@pytest.mark.parametrize("bad", [
    dict(eps_train=-0.1), dict(eps_train=1.5), dict(lam=-1.0), dict(steps=0), dict(epochs=0),
    dict(model="vgg99"), dict(dataset="imagenet"), dict(method="fgsm-at"), dict(schedule="cosine"),
    dict(step_size="fast"), dict(superclass=True), dict(method="madry", eps_train=0.0),
    dict(batch_size=1.5), dict(lr=0.0), dict(width=0),
])
def test_bad_values_are_user_errors(bad):
    with pytest.raises(UserError):
        make_train_config(**bad)


def test_unknown_preset_and_keys():
    with pytest.raises(UserError, match="unknown preset"):
        make_train_config("fastest")
    with pytest.raises(UserError, match="unknown TrainConfig key"):
        make_train_config(nonsense=1)


def test_eval_config_validation():
    cfg = make_eval_config(None, attacks=["PGD-20", "fgsm"], eps_test=["8/255"])
    assert cfg.attacks == ["pgd20", "fgsm"] and cfg.eps_test == [8 / 255]
    for bad in (dict(eps_test=[-0.1]), dict(eps_test=[]), dict(attacks=[]), dict(attacks=["x"]),
                dict(worst_k=0), dict(attacks=["PGD-20", "pgd20"])):   # a repeat would count twice
        with pytest.raises(UserError):
            make_eval_config(None, **bad)


def test_dict_roundtrip_and_type_errors():
    cfg = make_train_config("demo")
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(UserError, match="integer"):
        from_dict(TrainConfig, {"epochs": "many"})
    with pytest.raises(UserError, match="true or false"):
        from_dict(TrainConfig, {"download": "perhaps"})


def test_flags_are_generated_from_fields_and_only_given_ones_count():
    p = argparse.ArgumentParser()
    add_dataclass_flags(p, TrainConfig)
    args = p.parse_args(["--eps-train", "8/255", "--no-channels-last", "--lam", "0.5"])
    g = given(args, TrainConfig)
    assert g == {"eps_train": "8/255", "channels_last": False, "lam": "0.5"}
    cfg = make_train_config("demo", **g)
    assert cfg.eps_train == 8 / 255 and cfg.lam == 0.5 and cfg.channels_last is False
    p = argparse.ArgumentParser()
    add_dataclass_flags(p, EvalConfig)
    args = p.parse_args(["--eps-test", "16/255", "0.1", "--attacks", "pgd20"])
    assert make_eval_config(None, **given(args, EvalConfig)).eps_test == [16 / 255, 0.1]
