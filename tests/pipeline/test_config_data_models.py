import gzip
import pickle

import numpy as np
import pytest
import torch

from latprune.errors import BadInput
from latprune.models.registry import ModelSpec, available_models
from latprune.pipeline.config import BudgetConfig, RunConfig, load_config
from latprune.pipeline.data import DataConfig, _augment, load_dataset


@pytest.mark.parametrize("frac", [0.0, -0.5, 1.7])
def test_budget_out_of_range_names_the_fix(frac):
    with pytest.raises(BadInput, match=r"budget must be in \(0, 1\].*--budget 0.5"):
        BudgetConfig(fraction=frac)


def test_budget_ms_must_be_positive():
    with pytest.raises(BadInput, match="--budget-ms"):
        BudgetConfig(ms=0)


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = RunConfig().with_overrides(budget={"fraction": 0.3}, plan={"round_to": 16}, seed=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.yaml").write_text("plan:\n  round_two: 4\n")
    with pytest.raises(BadInput, match="round_two"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("budget:\n  fraction: 0.25\nseed: 7\n")
    assert load_config(tmp_path / "d.yaml").budget.fraction == 0.25


def test_unknown_model_lists_the_choices():
    with pytest.raises(BadInput, match="resnet20"):
        ModelSpec("resnet21").build()


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet18", "mobilenet_v2"])
def test_registered_models_build(name):
    assert name in available_models()
    m = ModelSpec(name, 10).build().eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_resnet20_has_projection_shortcuts_and_the_paper_size():
    m = ModelSpec("resnet20").build()
    assert isinstance(m.layer2[0].shortcut[0], torch.nn.Conv2d)
    n = sum(p.numel() for p in m.parameters())
    assert 270_000 < n < 280_000  # He et al.: 0.27M


def test_user_factory_and_broken_reference():
    assert ModelSpec("latprune.testing:plain_net").build()
    with pytest.raises(BadInput, match="PYTHONPATH"):
        ModelSpec("no_such_pkg.mod:f").build()


def test_augment_keeps_shape_and_content():
    x = np.random.default_rng(0).integers(0, 255, (6, 3, 32, 32), dtype=np.uint8)
    y = _augment(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.uint8


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_folder_is_padded_to_32_and_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    ds = load_dataset(DataConfig(name=str(tmp_path), val_size=20))
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train) == 180 and len(ds.val) == 20 and len(ds.test) == 50
    assert (ds.train.x[:, :, :2, :] == 0).all()  # the padding
    x, y = next(ds.batches(ds.train, 16, shuffle=True, augment=True, rng=np.random.default_rng(0)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32


def test_truncated_idx_file_is_refused(tmp_path):
    for split, n in (("train", 20), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.zeros(n))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        data = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-100])
    with pytest.raises(BadInput, match="truncated"):
        load_dataset(DataConfig(name=str(tmp_path), val_size=2))


def test_cifar10_python_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(1, 3):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (30, 3072)), "labels": list(rng.integers(0, 10, 30))}, f)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 255, (10, 3072)), "labels": list(range(10))}, f)
    ds = load_dataset(DataConfig(name=str(tmp_path), val_size=6))
    assert ds.name == "cifar10" and len(ds.train) == 54 and ds.input_shape == (3, 32, 32)


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((40, 50, 3), i * 20, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(DataConfig(name=str(tmp_path), val_size=2, image_size=24))
    assert ds.classes == ["cat", "dog"] and ds.input_shape == (3, 24, 24) and len(ds.test) == 12


def test_missing_or_empty_data_path(tmp_path):
    with pytest.raises(BadInput, match="neither an existing path"):
        load_dataset(DataConfig(name=str(tmp_path / "nope")))
    with pytest.raises(BadInput, match="train/ and test/"):
        load_dataset(DataConfig(name=str(tmp_path)))


@pytest.mark.parametrize("flag,plan_imp,extra,score", [("taylor", "halp", [], "planner"),
                                                        ("magnitude", "magnitude", [], "planner"),
                                                        ("l2", "magnitude", ["--neuron-score", "magnitude"],
                                                         "magnitude"),
                                                        ("halp", "halp", ["--neuron-score", "taylor"], "taylor")])
def test_importance_flag_sets_the_pruning_criterion_and_neuron_score_its_own(flag, plan_imp, extra, score):
    """AdaSAP's neuron score is the planner's key whatever the criterion; --neuron-score picks an ablation."""
    from latprune.cli import _parser, config_from_args

    args = _parser().parse_args(["run", "--importance", flag, "--target", "params", "--param-ratio", "0.4",
                                 "--method", "sam", *extra])
    if flag in ("l2", "taylor"):  # old names: accepted, with a deprecation warning
        with pytest.warns(DeprecationWarning, match=f"'{flag}' is deprecated"):
            cfg = config_from_args(args)
    else:
        cfg = config_from_args(args)
    assert cfg.plan.importance == plan_imp and cfg.optimizer.score == score
    assert cfg.schedule.target == "params" and cfg.schedule.param_ratio == 0.4 and cfg.optimizer.method == "sam"


@pytest.mark.parametrize("extra,norm", [([], "neuron"), (["--rho-norm", "global"], "global")])
def test_rho_norm_flag_picks_adasaps_normalisation(extra, norm):
    from latprune.cli import _parser, config_from_args

    cfg = config_from_args(_parser().parse_args(["run", "--method", "adasap", "--rho-max", "2.0", *extra]))
    assert cfg.optimizer.normalize == norm and cfg.optimizer.rho_max == 2.0
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--rho-norm", "layer"])


def test_renamed_spellings_still_load_with_a_warning(tmp_path):
    """Config files and run directories written before the layout change keep working: the section
    ``sharpness`` is now ``optimizer`` and the importance ``l2`` is now ``magnitude``."""
    p = tmp_path / "old.yaml"
    p.write_text("sharpness: {method: sam, rho: 0.2}\nplan: {importance: l2}\n")
    with pytest.warns(DeprecationWarning) as seen:
        cfg = load_config(p)
    assert cfg.optimizer.method == "sam" and cfg.optimizer.rho == 0.2 and cfg.plan.importance == "magnitude"
    assert {"config section 'sharpness' is deprecated", "importance 'l2' is deprecated"} <= {
        str(w.message).split(":")[0] for w in seen}
    assert RunConfig.from_dict(cfg.to_dict()) == cfg and "sharpness" not in cfg.to_dict()
    with pytest.raises(BadInput, match="keep only 'optimizer'"), pytest.warns(DeprecationWarning):
        RunConfig.from_dict({"sharpness": {}, "optimizer": {}})
    with pytest.warns(DeprecationWarning, match="plan.taylor_batches is ignored"):  # a retired setting
        assert RunConfig.from_dict({"plan": {"taylor_batches": 4, "round_to": 16}}).plan.round_to == 16
