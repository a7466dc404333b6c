"""Many slides from a manifest CSV; folds by group (leave one patient out) when groups hold several slides."""

from __future__ import annotations

import numpy as np
import pytest

from hevisum.config import PreprocessConfig
from hevisum.cv import make_folds
from hevisum.demo import DemoSpec, write_demo
from hevisum.errors import HevisumError
from hevisum.io import read_inputs
from hevisum.preprocess.pipeline import preprocess


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("man")
    h5, _ = write_demo(tmp / "d.h5", DemoSpec(n_train=4, n_test=1, n_spots=50, n_targets=6, seed=3), progress=False)
    return tmp, h5


def test_a_manifest_names_slides_splits_and_groups_and_folds_hold_out_whole_groups(demo, tmp_path):
    tmp, h5 = demo
    man = tmp / "cohort.csv"
    man.write_text("path,slide,split,group\n"
                   "d.h5,S_1,train,patient-a\nd.h5,S_2,train,patient-a\n"
                   "d.h5,S_3,train,patient-b\nd.h5,S_4,test,patient-b\nd.h5,S_5,test,patient-c\n")
    slides = read_inputs([str(man)], progress=False)
    got = {s.slide_id: (s.split, s.meta["group"]) for s in slides}
    assert got == {"S_1": ("train", "patient-a"), "S_2": ("train", "patient-a"), "S_3": ("train", "patient-b"),
                   "S_4": ("test", "patient-b"), "S_5": ("test", "patient-c")}
    assert slides[3].meta.get("truth") is not None  # a Train slide of the file made Test keeps its truth
    prep = preprocess(slides, PreprocessConfig(), tmp_path / "w", progress=False)
    folds = make_folds(prep.spots)
    assert folds.slide_ids == ["patient-a", "patient-b"]
    held_a = folds.train_rows[folds.slides == "patient-a"]
    assert set(prep.spots.loc[held_a, "slide"]) == {"S_1", "S_2"}
    # without groups: leave one slide out, as before
    plain = make_folds(prep.spots.drop(columns="group"))
    assert plain.slide_ids == ["S_1", "S_2", "S_3"]
    assert np.array_equal(np.sort(plain.train_rows), np.sort(folds.train_rows))


@pytest.mark.parametrize("text, words", [
    ("path,slide,colour\nd.h5,S_1,red\n", "unknown manifest column"),
    ("path,slide\nd.h5,S_9\n", "S_9"),
    ("path,split\nd.h5,validation\n", "validation"),
    ("path,um_per_px\nd.h5,-1\n", "um_per_px"),
    ("path\nnowhere.h5\n", "nowhere.h5"),
])
def test_a_bad_manifest_is_one_line_naming_the_row_and_what_is_valid(demo, text, words):
    tmp, _ = demo
    man = tmp / "bad.csv"
    man.write_text(text)
    with pytest.raises(HevisumError, match=words):
        read_inputs([str(man)], progress=False)
