"""The README's cluster command, run as written on a layout like the one it names: torchrun, FSDP, an HF Qwen2 LLM
folder, a SigLIP teacher folder, LLaVA-Pretrain's captions under their own image root and an instruction file in
LLaVA-v1.5-mix665K's layout (COCO-style paths, a text-only conversation among them).

Only what cannot run on a test machine is changed: the paths (tests-made folders), 8 processes (2, gloo), and sizes
appended as later --set overrides (image size, embedder width, batch, steps), which win over the command's own. Every
other key of the command reaches the recipe as written, so a key the recipes lose, rename or stop accepting fails
here."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("transformers")

from test_hf_llm_e2e import COLOURS, write_llm  # noqa: E402  (tests-made HF folders, shared with the e2e test)

pytestmark = pytest.mark.slow  # a torchrun launch

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = ["model.vision.max_pixels=3136", "model.vision.embedder_width=32", "model.vision.embedder_heads=2",
          "stages.*.batch_size=2", "stages.*.steps=2", "stages.*.warmup_steps=1", "align.whiten_images=16"]


def cluster_command() -> list[str]:
    """The README's cluster-run command as argv, its line continuations joined."""
    text = README.read_text()
    block = re.search(r"\*\*A cluster run\*\*.*?```bash\n(.*?)```", text, re.S)
    assert block, "README: the cluster-run command block is gone"
    return shlex.split(block.group(1).replace("\\\n", " "))


def write_llava_layout(root: Path, count: int = 12) -> Path:
    """LLaVA-Pretrain/{blip_laion_cc_sbu_558k.json, images/00000/*.jpg} and llava_v1_5_mix665k.json with
    coco/train2017/*.jpg paths, as the public sets lay them out."""
    captions, mix = [], []
    names = list(COLOURS)
    for index in range(count):
        square, background = names[index % 4], names[(index // 4 + 1 + index % 4) % 4]
        image = Image.new("RGB", (56, 56), COLOURS[background])
        image.paste(COLOURS[square], (14, 14, 42, 42))
        pretrain_path = f"00000/{index:09d}.jpg"
        coco_path = f"coco/train2017/{index:012d}.jpg"
        for path in (root / "LLaVA-Pretrain" / "images" / pretrain_path, root / coco_path):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)
        captions.append({"id": f"{index:09d}", "image": pretrain_path, "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": f"a {square} square on a {background} background"}]})
        mix.append({"id": f"{index:012d}", "image": coco_path, "conversations": [
            {"from": "human", "value": "What colour is the square?\n<image>"}, {"from": "gpt", "value": square},
            {"from": "human", "value": "And the background?"}, {"from": "gpt", "value": background}]})
    mix.append({"id": "sharegpt_0", "conversations": [  # mix665K holds text-only ShareGPT conversations too
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello, how can I help?"}]})
    (root / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(captions))
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))
    return root


def write_siglip(folder: Path) -> Path:
    import transformers

    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=56, patch_size=14)
    transformers.SiglipVisionModel(config).save_pretrained(str(folder))
    return folder


def test_the_readme_cluster_command_trains_under_torchrun_fsdp(tmp_path):
    data = write_llava_layout(tmp_path / "llava")
    llm = tmp_path / "Qwen2-0.5B-Instruct"
    llm.mkdir()
    write_llm(llm, "qwen2")
    siglip = write_siglip(tmp_path / "siglip-so400m-patch14-384")
    out = tmp_path / "eve-qwen2"

    argv = cluster_command()
    assert argv[:3] == ["torchrun", "--nproc-per-node", "8"] and argv[3:6] == ["-m", "monovlm", "train"]
    paths = {"/data/llava": str(data), "runs/eve-qwen2": str(out), "/models/Qwen2-0.5B-Instruct": str(llm),
             "/models/siglip-so400m-patch14-384": str(siglip)}
    args = [paths.get(arg, arg) for arg in argv[3:]]
    args = [re.sub(r"^(model\.init|align\.teacher)=(hf:)?(/models/.*)$",
                   lambda m: f"{m[1]}={m[2] or ''}{paths[m[3]]}", arg) for arg in args]
    assert str(llm) in " ".join(args) and str(siglip) in " ".join(args), args
    for override in SHRINK:
        args += ["--set", override]
    args += ["--no-progress", "--no-eval", "--dtype", "float32"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONOVLM_PEAK_CACHE": str(tmp_path / "peak_flops.json")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(_free_port())]
    done = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]

    recipe = json.loads((out / "recipe.json").read_text())
    stages = {stage["name"]: stage for stage in recipe["stages"]}
    # the command's own values arrive where they are not shrunk
    assert recipe["model"]["init"] == str(llm) and recipe["align"]["teacher"] == f"hf:{siglip}"
    assert recipe["model"]["vision"]["patch_size"] == 14
    assert (stages["prealign"]["lr"], stages["pretrain"]["lr"], stages["instruct"]["lr"]) == (4e-4, 4e-5, 2e-5)
    assert all(stage["grad_accum"] == 4 and stage["max_length"] == 2048 for stage in stages.values())
    assert recipe["data"]["captions_image_root"] == "LLaVA-Pretrain/images"
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in row for row in losses) == 6  # 2 optimizer steps in each of the three stages
    assert (out / "final" / "model.safetensors").is_file() or any((out / "final").glob("*.safetensors"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
