"""A wrong number of classes fails when the Trainer or the predictor is built, not after training."""
from pathlib import Path

import pytest

import cpm_d2  # noqa: F401
from cpm_d2.config import setup_cfg
from cpm_d2.data import generate_synthetic_avs, register_avs_dataset
from cpm_d2.engine import AVSPredictor, Trainer
from cpm_d2.engine.num_classes import check_num_classes

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "baseline_r18_tiny.yaml")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_synthetic_avs(tmp_path_factory.mktemp("nc") / "syn", seed=3,
                                  clips_per_split={"train": 1, "test": 1}, frames_per_clip=1, image_size=(24, 32))


def test_wrong_num_classes_fails_when_the_trainer_or_predictor_is_built(root, names):
    train, test = names("nc_train"), names("nc_test")
    register_avs_dataset(train, root, split="train")
    register_avs_dataset(test, root, split="test")
    # without a test set this used to train to the end and exit 0
    cfg = setup_cfg(TINY, ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()",
                           "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7"])
    message = (rf"^MODEL.SEM_SEG_HEAD.NUM_CLASSES is 7, but dataset '{train}' \(DATASETS.TRAIN\) has 5 classes "
               r"\(background, red_square, green_circle, blue_triangle, \.\.\., background included, from its metadata "
               r"'stuff_classes'\): set MODEL.SEM_SEG_HEAD.NUM_CLASSES 5$")
    with pytest.raises(ValueError, match=message):
        Trainer(cfg)
    # --eval-only builds the model with Trainer.build_model; the predictor checks before building anything
    cfg = setup_cfg(TINY, ["DATASETS.TRAIN", "()", "DATASETS.TEST", f"('{test}',)",
                           "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7", "MODEL.WEIGHTS", "/nonexistent.pth"])
    with pytest.raises(ValueError, match=rf"dataset '{test}' \(DATASETS.TEST\) has 5 classes"):
        Trainer.build_model(cfg)
    with pytest.raises(ValueError, match=rf"dataset '{test}' \(DATASETS.TEST\) has 5 classes"):
        AVSPredictor(cfg)
    check_num_classes(setup_cfg(TINY, ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)"]))


def test_datasets_that_disagree_are_named_together(root, names, tmp_path):
    other = generate_synthetic_avs(tmp_path / "hard", seed=3, clips_per_split={"train": 1}, frames_per_clip=1,
                                   image_size=(24, 32), num_classes=6)
    a, b = names("nc_a"), names("nc_b")
    register_avs_dataset(a, root, split="train")
    register_avs_dataset(b, other, split="train")
    cfg = setup_cfg(TINY, ["DATASETS.TRAIN", f"('{a}',)", "DATASETS.TEST", f"('{b}',)"])
    with pytest.raises(ValueError, match=rf"do not agree on their number of classes \('{a}' \(DATASETS.TRAIN\): 5; "
                                         rf"'{b}' \(DATASETS.TEST\): 7\)"):
        check_num_classes(cfg)


def test_class_names_of_another_length_than_label2idx_are_refused(root, names, logged):
    name = names("nc_names")
    with pytest.raises(ValueError, match=rf"^dataset '{name}': class_names has 3 names, but {root}/label2idx.json lists "
                                         r"5 classes \(background, red_square, green_circle, blue_triangle, \.\.\.\)"):
        register_avs_dataset(name, root, split="train", class_names=["background", "a", "b"])
    warnings = logged("cpm_d2.data.datasets.avss")
    register_avs_dataset(name, root, split="train", class_names=["background", "a", "b", "c", "d"])
    assert any("class_names[1] is 'a'" in w and "'red_square'" in w for w in warnings)
