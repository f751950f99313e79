"""Training and evaluation on a CUDA device: the whole trainer (teacher, align loss, bf16 autocast, periodic eval)
where a GPU is present; skipped on machines without one."""

import pytest
import torch

from monovlm.data.synthetic import synthesize
from monovlm.train.recipe import AlignConfig
from monovlm.train.trainer import TrainOptions, train
from test_train import tiny_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("whiten", [False, True])
def test_align_recipe_with_a_pretrained_vit_teacher_trains_on_cuda(tmp_path, whiten):
    """A CNN-stem ViT teacher pretrained on the data, copied into the student's stem, whitened or not: it must run
    on the model's device under bf16 autocast, and the run must learn."""
    root = tmp_path / "data"
    synthesize(root, n=40, seed=0, image_size=32, progress=False)
    recipe = tiny_recipe()
    recipe.model.vision["stem"] = "cnn"
    recipe.align = AlignConfig(teacher_steps=4, teacher_width=16, teacher_depth=0, teacher_stem="cnn", heads=2,
                               init_stem=True, whiten=whiten, whiten_images=16)
    for stage in recipe.stages:
        stage.align = True
    result = train(TrainOptions(recipe=recipe, data_root=root, run_dir=tmp_path / "run", progress=False,
                                measure_peak=False, eval_limit=8, device="cuda", dtype="bfloat16"))
    assert len(result.losses) == 10 and all(torch.isfinite(torch.tensor(result.losses)))
    assert next(result.model.parameters()).device.type == "cuda"
    assert min(result.losses[-3:]) < result.losses[0]
