"""The command line: help lists the verbs, tokenizer training and text generation run end to end, errors are plain."""

import subprocess
import sys

import pytest

from monovlm.cli import main
from monovlm.config import DecoderConfig
from monovlm.model.decoder import Decoder
from monovlm.model.hf import save_hf_decoder
from monovlm.tokenizer import Tokenizer


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "monovlm", "--help"], capture_output=True, text=True, check=True)
    for verb in ("generate-text", "train-tokenizer", "data", "train", "recipes", "quickstart", "eval", "compare",
                 "chat", "serve"):
        assert verb in out.stdout


def test_recipes_lists_the_shipped_ones_and_describes_one(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name in ("eve", "eve-synthetic", "evev2", "mono-internvl", "neo", "breen", "hovle", "solo", "llava",
                 "llava-synthetic"):
        assert f"\n{name} " in f"\n{listing}"
    assert "stages: prealign -> pretrain -> instruct" in listing
    assert main(["recipes", "eve"]) == 0
    described = capsys.readouterr().out
    assert 'data.captions = "captions.json"  read by prealign, pretrain' in described
    assert "3. instruct" in described and "stages.NAME.KEY (NAME: prealign, pretrain, instruct" in described
    assert main(["recipes", "hovle"]) == 0
    assert "align loss; no next-token loss; text distillation ×1" in capsys.readouterr().out
    assert main(["recipes", "no-such-recipe"]) == 2
    assert "shipped recipes: [" in capsys.readouterr().err


def test_train_refuses_a_bad_override_before_reading_data(tmp_path, capsys):
    assert main(["train", "eve", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--set", "stages.instruct.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage key 'stepz'" in err and "Traceback" not in err
    assert main(["train", "eve", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "missing captions.json (read by prealign, pretrain); instruct.json (read by instruct)" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_every_command_function_is_a_listed_verb():
    """cli.COMMANDS lists the verbs explicitly (commands.py never imports cli): a new command must be added there."""
    import inspect

    from monovlm import commands
    from monovlm.cli import COMMANDS

    functions = {f for _, f in inspect.getmembers(commands, inspect.isfunction) if f.__module__ == commands.__name__}
    assert functions == set(COMMANDS.values())


def test_train_tokenizer_then_generate(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the red circle is left of the blue square.\n" * 50 + "héllo wörld ✓\n" * 10)
    model_dir = tmp_path / "model"
    assert main(["train-tokenizer", str(text), "--out", str(model_dir), "--vocab-size", "300"]) == 0
    tokenizer = Tokenizer.from_folder(model_dir)
    assert tokenizer.decode(tokenizer.encode("héllo wörld ✓")) == "héllo wörld ✓"
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id))
    save_hf_decoder(decoder, model_dir)
    capsys.readouterr()
    assert main(["generate-text", str(model_dir), "the red", "--max-new-tokens", "5", "--no-chat"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    # seeded sampling is reproducible through the CLI
    outputs = []
    for _ in range(2):
        main(["generate-text", str(model_dir), "the red", "--max-new-tokens", "8", "--temperature", "1.0",
              "--seed", "3"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_wrong_model_path_is_a_plain_error(tmp_path, capsys):
    assert main(["generate-text", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "missing" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["generate-text"], ["generate"], ["no-such-verb"]])
def test_bad_usage_exits_nonzero(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0


def test_data_synth_twice_gives_identical_files(tmp_path):
    import hashlib

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    for name in ("a", "b"):
        assert main(["data", "synth", "--out", str(tmp_path / name), "--n", "40", "--seed", "0", "--no-progress"]) == 0
    first, second = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert first == second and "instruct_test.json" in first and len(first) > 40


def test_chat_with_the_shipped_model_answers_about_an_image(tmp_path, capsys):
    from monovlm.paths import DEFAULT_MODEL_DIR

    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 25 * 2**20  # the repo's size budget
    from monovlm.data.synthetic import synthesize

    synthesize(tmp_path, n=20, seed=3, progress=False)
    import json

    record = next(r for r in json.loads((tmp_path / "instruct.json").read_text()) if r["category"] == "attribute")
    assert main(["chat", "--image", str(tmp_path / record["image"]), record["question"]]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and len(answer.split()) <= 3  # a short answer from the trained model, not a ramble
