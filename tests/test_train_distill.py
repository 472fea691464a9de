"""Knowledge distillation end to end: a student trained against another run's checkpoint;
a teacher workdir without a run is refused before anything is written."""

import pytest
from train_tiny import tiny_config

from wrcor_jax.train.train import train_and_evaluate


def test_distillation_from_another_run(tmp_path):
    train_and_evaluate(tiny_config(2), tmp_path / "teacher")
    student = tiny_config(2, f"teacher_workdir={tmp_path / 'teacher'}", "kd_ratio=0.5")
    result = train_and_evaluate(student, tmp_path / "student")
    assert 0 <= result["eval_top1"] <= 1
    orphan = tiny_config(2, f"teacher_workdir={tmp_path}")
    with pytest.raises(ValueError, match="holds no training run"):
        train_and_evaluate(orphan, tmp_path / "orphan")
    assert not (tmp_path / "orphan").exists()
