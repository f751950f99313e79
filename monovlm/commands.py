"""The verbs of the `monovlm` command line. Each is a typed function whose signature and docstring cli.py turns into
the verb's arguments and help (cli.COMMANDS names them); imports are local so that `monovlm --help` stays fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def generate_text(
    model: Path,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    chat: bool = True,
    dtype: str = "float32",
) -> None:
    """Continue a text prompt with a text-only HF-format language model (`monovlm chat` talks to a VLM).
    The model folder holds its tokenizer files too.

    Args:
        model: folder with config.json, model.safetensors and tokenizer.json
        prompt: the prompt text
        max_new_tokens: most tokens to generate
        temperature: 0 for greedy decoding, > 0 to sample
        top_k: sample only among the k most likely tokens
        top_p: sample only among the most likely tokens reaching this probability mass
        seed: seed for sampling (same seed, same output)
        stop: stop strings that end generation
        chat: wrap the prompt in the tokenizer's chat template when it has one
        dtype: float32 or bfloat16
    """
    import torch

    from monovlm.infer.generate import GenerationConfig, stream_text
    from monovlm.model.hf import load_hf_decoder
    from monovlm.tokenizer import Tokenizer, TokenizerError

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"--dtype {dtype!r} is not supported; use float32 or bfloat16")
    tokenizer = Tokenizer.from_folder(model)
    decoder = load_hf_decoder(model, dtype=torch_dtype).eval()
    text = prompt
    end_of_turn = None
    if chat:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            end_of_turn = tokenizer.end_of_turn_token()  # e.g. <|eot_id|>, which need not be eos
        except TokenizerError:
            pass  # no chat template: a base model continues the raw prompt
    prompt_ids = tokenizer.encode(text)
    eos = decoder.config.eos_token_id
    stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for extra in (tokenizer.eos_id, tokenizer.token_to_id(end_of_turn) if end_of_turn is not None else None):
        if extra is not None and extra not in stop_ids:
            stop_ids.append(extra)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              stop_ids=stop_ids, stop_strings=stop or (), seed=seed)
    for deltas in stream_text(decoder, [prompt_ids], tokenizer, config, pad_id=tokenizer.pad_id or 0):
        sys.stdout.write(deltas[0])
        sys.stdout.flush()
    sys.stdout.write("\n")


def train_tokenizer(
    texts: list[Path],
    *,
    out: Path,
    vocab_size: int = 4096,
) -> None:
    """Train a byte-level BPE tokenizer (with monovlm's image special tokens) on local text files.

    Args:
        texts: one or more UTF-8 text files
        out: folder to write tokenizer.json and tokenizer_config.json into
        vocab_size: size of the vocabulary, special tokens included
    """
    from monovlm.tokenizer import train_bpe_tokenizer

    for path in texts:
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")

    def lines():
        for path in texts:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f

    tokenizer = train_bpe_tokenizer(lines(), vocab_size=vocab_size)
    tokenizer.save(out)
    print(f"wrote a {tokenizer.vocab_size}-token tokenizer to {out}")


def data_synth(
    *,
    out: Path,
    n: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    test_fraction: float = 0.2,
    maze_fraction: float = 0.2,
    maze_min_cells: int = 3,
    maze_max_cells: int = 4,
    train_negatives: str = "pope",
    progress: bool = True,
) -> None:
    """Write a seeded synthetic VLM data set (PNGs + LLaVA JSON): captions (captions.json), QA by category with
    POPE-style existence (instruct.json, instruct_test.json), mazes with pixel-derived loop labels, and the
    existence drills of the eve-synthetic recipe (colour_train.json, existence_train.json,
    instruct_train_no_existence.json). The same seed gives byte-identical files.

    Args:
        out: output folder
        n: number of images
        seed: random seed
        image_size: side of the square images in pixels
        test_fraction: share of images held out for the test split
        maze_fraction: share of images that are mazes
        maze_min_cells: smallest maze side in cells
        maze_max_cells: largest maze side in cells (larger mazes have longer loops: harder)
        train_negatives: train existence negatives: pope (POPE's samplers) or balanced (the name says nothing)
        progress: show a progress bar
    """
    from monovlm.data.synthetic import synthesize

    summary = synthesize(out, n=n, seed=seed, image_size=image_size, test_fraction=test_fraction,
                         maze_fraction=maze_fraction, progress=progress,
                         maze_cells=(maze_min_cells, maze_max_cells), train_negatives=train_negatives)
    print(json.dumps(summary, indent=1, sort_keys=True))


def data_shard(
    source: Path,
    *,
    out: Path,
    samples_per_shard: int = 10_000,
    image_root: Path | None = None,
    progress: bool = True,
) -> None:
    """Write a LLaVA JSON/JSONL file and its images as a WebDataset shard folder, which a recipe stage reads in place
    of the file (`--set stages.NAME.data=FOLDER`): OUT/shard-000000.tar, ... (per sample KEY.json, the record as it
    is, and its images' original bytes, KEY.png or KEY.0.png, KEY.1.jpg, ... for an image list) and OUT/shards.json
    (the shard list, wids' index format; written last). Records the datasets would skip as malformed, and records
    whose image is missing, escapes the image root or has no image header, are left out and counted.

    Args:
        source: the LLaVA .json or .jsonl file
        out: the shard folder to write (new or empty)
        samples_per_shard: samples per tar
        image_root: the folder image paths are relative to; none: the file's folder
        progress: show a progress bar
    """
    from monovlm.data.shards import write_shards

    summary = write_shards(source, out, samples_per_shard=samples_per_shard, image_root=image_root, progress=progress)
    print(summary.line(out))


def teacher_features(
    *,
    teacher: str,
    data: Path,
    out: Path,
    files: list[str] | None = None,
    recipe: str | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    select_layer: int = -2,
    image_size: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Precompute an HF vision teacher's patch features for the images of LLaVA data files, for a recipe's
    `align.teacher = "features:PATH"` (a relative PATH is read under --data): the teacher then never runs in training.

    Args:
        teacher: hf:PATH, a local CLIP/SigLIP vision model folder
        data: data root (the data files and their images are relative to it)
        out: the safetensors file to write (features keyed by image path)
        files: LLaVA JSON/JSONL files whose images to read (default: every stage's files of --recipe)
        recipe: the recipe whose image settings ([model.vision]) and, without --files, data files to use
        dtype: float16, bfloat16 or float32 storage
        batch_size: images per teacher forward
        select_layer: the hidden layer whose patch features are kept (-2: the penultimate, as LLaVA)
        image_size: the teacher's input side in pixels (default: its config's)
        device: cpu or cuda
        progress: show a progress bar
    """
    from monovlm.config import VisionConfig
    from monovlm.data.image_files import stage_sources
    from monovlm.train.recipe import load_recipe
    from monovlm.train.teacher_features import precompute_teacher_features

    vision, sources = None, list(files or [])
    if recipe is not None:
        loaded = load_recipe(recipe)
        vision = VisionConfig(**loaded.model.vision)
        sources = sources or stage_sources(loaded.stages)
    if not sources:
        raise ValueError("name the data files with --files (or a --recipe whose stages name them)")
    precompute_teacher_features(teacher, data, sources, out, vision=vision, dtype=dtype, batch_size=batch_size,
                                select_layer=select_layer, image_size=image_size, device=device, progress=progress)


def train_command(
    recipe: str,
    *,
    data: Path | None = None,
    out: Path | None = None,
    set: list[str] | None = None,
    dry_run: bool = False,
    dry_run_steps: int = 0,
    dry_run_stage: str = "0",
    resume: bool = False,
    overwrite: bool = False,
    strategy: str = "ddp",
    dtype: str = "auto",
    device: str | None = None,
    eval_data: str = "instruct_test.json",
    eval: bool = True,
    eval_limit: int = 200,
    stop_after: int | None = None,
    progress: bool = True,
) -> None:
    """Train a VLM with a recipe on a LLaVA-format data folder: eve, evev2, solo, llava (your data: captions.json,
    instruct.json and the images), eve-synthetic, llava-synthetic (the output of `monovlm data synth`), or a path to
    a TOML file. `monovlm recipes NAME` lists a recipe's stages, files and every key --set changes, e.g.
    `monovlm train eve --data DIR --out RUN --set stages.instruct.steps=2000 --set model.init=path/to/llm
    --set align.teacher=hf:path/to/siglip`. The recipe as run (overrides applied) is written to RUN/recipe.json;
    --resume refuses a recipe that differs from it, and data files that changed (RUN/data.json); a fresh run into a
    folder that holds a run stops unless --overwrite. Works under torchrun:
    `torchrun --nproc-per-node 8 -m monovlm train eve --data DIR --out RUN --strategy fsdp`.

    Args:
        recipe: shipped recipe name or path to a recipe TOML
        data: data root (the recipe's data files and image paths are relative to it)
        out: run folder for checkpoints, metrics.jsonl, recipe.json and the final model
        set: KEY=VALUE overriding a recipe value, e.g. stages.instruct.steps=2000 (keys: `monovlm recipes NAME`)
        dry_run: read no data and train nothing: print per part the parameters (trainable, frozen), tokens and
            FLOPs per step and the estimated peak memory per device for --strategy (with the world size torchrun
            gives), then run --dry-run-steps steps on random inputs of the recipe's shapes and print the measured
            step time and peak memory beside the estimate
        dry_run_steps: steps on random inputs for --dry-run (0: the estimate only)
        dry_run_stage: the stage those steps run (its name or index; its trainable parts head the table)
        resume: continue from the newest checkpoint in --out that loads (with the recipe, overrides and data it was
            started with)
        overwrite: replace the run --out already holds (without it a fresh run into a folder holding a run stops)
        strategy: with torchrun: ddp or fsdp
        dtype: autocast dtype: auto (bfloat16 where this machine multiplies it fast: CUDA, or a CPU with native bf16;
            else float32), bfloat16, float16 or float32 (weights stay fp32)
        device: cpu or cuda (default: cuda when available)
        eval_data: QA file (relative to --data) evaluated at the end of each question-answer stage
        eval: evaluate during training (--no-eval: never)
        eval_limit: most eval questions
        stop_after: stop after this many optimizer steps in total (a checkpoint boundary lets --resume continue)
        progress: show progress bars
    """
    import os

    from monovlm.train.recipe import load_recipe, resolve_data
    from monovlm.train.trainer import TrainOptions, train

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"--strategy {strategy!r}: use ddp or fsdp")
    if dtype not in ("auto", "bfloat16", "float32", "float16"):
        raise ValueError(f"--dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    if dry_run:
        from monovlm.train.dry_run import dry_run as plan

        recipe_object = load_recipe(recipe, set or ())
        print(plan(recipe_object, data, steps=dry_run_steps, strategy=strategy,
                   world_size=int(os.environ.get("WORLD_SIZE", "1")), dtype=dtype,
                   checkpointing=recipe_object.activation_checkpointing, device=device,
                   stage=int(dry_run_stage) if dry_run_stage.lstrip("-").isdigit() else dry_run_stage).text())
        return
    if data is None or out is None:
        raise ValueError("monovlm train needs --data (the data folder) and --out (the run folder)")
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs this; one of them speaks
    # every file checked before the model is built or a teacher trained: a missing one is one error, not a crash later
    resolved = resolve_data(load_recipe(recipe, set or ()), data, log=print if main_rank else None)
    train(TrainOptions(recipe=resolved, data_root=data, run_dir=out, resume=resume, overwrite=overwrite,
                       device=device, strategy=strategy, dtype=dtype, eval_data=eval_data if eval else None,
                       eval_limit=eval_limit, stop_after=stop_after, progress=progress))


def recipes_command(name: str | None = None, /) -> None:
    """List the shipped training recipes, or describe one (a name or a TOML path): the data files it reads, its
    stages, and every key `monovlm train NAME --set KEY=VALUE` can change, with its value and type.

    Args:
        name: a shipped recipe name or a recipe TOML path (omit it to list the shipped recipes)
    """
    from monovlm.train.recipe import describe_recipe, load_recipe, recipe_path, shipped_recipes

    if name is not None:
        print(describe_recipe(load_recipe(name), recipe_path(name)))
        return
    recipes = {shipped: load_recipe(shipped) for shipped in shipped_recipes()}
    width = max(len(shipped) for shipped in recipes)
    for shipped, loaded in recipes.items():
        stages = " -> ".join(stage.name for stage in loaded.stages)
        print(f"{shipped:<{width}}  {loaded.description}\n{'':<{width}}  stages: {stages}")
    print("\n`monovlm recipes NAME` describes one: its files, stages and the keys --set changes")


def quickstart(
    *,
    out: Path = Path("runs/quickstart"),
    recipe: str = "eve-synthetic",
    n: int = 4000,
    maze_fraction: float = 0.2,
    seed: int = 0,
    eval_limit: int = 1000,
    ship: bool = False,
    force_ship: bool = False,
    progress: bool = True,
) -> None:
    """Synthesise data, train the tiny encoder-free model (the eve-synthetic recipe), evaluate it beside a blind
    baseline, and answer questions about held-out images. About 15 minutes on 2 CPU cores; fully offline.

    Args:
        out: output folder (data, run, report)
        recipe: training recipe
        n: number of synthetic images
        maze_fraction: share of the images that are mazes
        seed: seed for data and training
        eval_limit: most test questions to evaluate
        ship: replace the shipped model of `monovlm chat` (bf16) if this one is materially better; source checkout only
        force_ship: with --ship, replace it even when it does not answer better
        progress: show progress bars
    """
    from monovlm.quickstart import run_quickstart

    run_quickstart(out, recipe, n=n, seed=seed, eval_limit=eval_limit, ship=ship, force_ship=force_ship,
                   progress=progress, maze_fraction=maze_fraction)


def eval_command(
    model: str,
    *,
    tasks: list[str] | None = None,
    data: Path | None = None,
    out: Path | None = None,
    limit: int | None = 1000,
    batch_size: int = 32,
    blind: bool = True,
    reduce: str | None = None,
    keep: list[float] | None = None,
    visual_position_step: list[float] | None = None,
    token_pool: list[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Evaluate a model on tasks, beside the blind baseline (the same questions with a grey image); write
    report.json, report.md and PNG plots. Shipped tasks: synthetic, synthetic_pope, vqav2, gqa, pope, mme,
    coco_captions, llava (or a task TOML file).

    Args:
        model: a monovlm model folder, or "default" for the shipped tiny model
        tasks: task names or task TOML files (default: synthetic)
        data: the folder the tasks read (default for the synthetic tasks: the quickstart's data, synthesised if missing)
        out: report folder (default: runs/eval/<model name>)
        limit: most samples per task (0 for all)
        batch_size: questions per batched generation
        blind: also run the blind baseline
        reduce: a visual token reduction method (evaluated at each --keep ratio beside the unreduced model)
        keep: fraction(s) of visual tokens kept with --reduce (default: 0.5, 0.25, 0.11)
        visual_position_step: V2PE: also evaluate with visual tokens advancing the position by each of these
            steps in (0, 1] (instead of the model's own)
        token_pool: TokenFLEX: also evaluate with each image's token grid average-pooled by each of these factors
            (2: about a quarter of the visual tokens)
        device: cpu or cuda
        progress: show progress bars
    """
    from monovlm.eval.run import run_eval

    run_eval(model, tasks or ["synthetic"], data=data, out=out, limit=limit or None, batch_size=batch_size,
             blind=blind, reduce=reduce, keep=keep, device=device, progress=progress,
             position_steps=visual_position_step, token_pools=token_pool)


def compare_command(reports: list[str], *, tasks: list[str] | None = None, data: Path | None = None,
                    limit: int | None = 1000, out: Path | None = None) -> None:
    """Print evaluation results of several models side by side (each argument: an eval report folder or
    report.json, or a model folder, which is evaluated first).

    Args:
        reports: eval output folders / report.json files / model folders ("default" = the shipped model)
        tasks: tasks for the model folders (default: synthetic)
        data: data folder for the model folders' tasks
        limit: most samples per task for the model folders
        out: also write the comparison to this Markdown file
    """
    from monovlm.eval.run import run_compare

    run_compare(reports, tasks=tasks or ["synthetic"], data=data, limit=limit or None, out=out)


def chat(
    question: str | None = None,
    /,
    *,
    image: list[Path] | None = None,
    model: Path | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
    reduce: str | None = None,
    keep: float | None = None,
    decoding: str | None = None,
    system: str | None = None,
    visual_position_step: float | None = None,
) -> None:
    """Chat with a VLM about images in the terminal (default model: the shipped tiny one, trained on synthetic
    shapes). With a question, answer it and exit; without, read questions from standard input, keeping the
    conversation: `/image PATH` attaches an image to the next question, `/reset` forgets the conversation, `/quit` ends.

    Args:
        question: a question to answer at once (omit it for an interactive chat)
        image: image file(s) the (first) question is about
        model: a monovlm model folder (default: the shipped tiny model)
        max_new_tokens: most tokens in each answer
        temperature: 0 for greedy decoding
        seed: sampling seed
        reduce: visual token reduction for questions with images, e.g. fastv, tome, divprune (a wrong name lists all)
        keep: share of each image's patch tokens the reduction keeps, in (0, 1]; 0.25 when not given
        decoding: decoding strategy for questions with images: vcd or damro
        system: a system message opening the conversation, in place of the model's own system prompt (if it has one)
        visual_position_step: V2PE: visual tokens advance the position by this step in (0, 1] (default: the model's)
    """
    from monovlm.data.processor import Processor
    from monovlm.infer.generate import GenerationConfig
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.paths import DEFAULT_MODEL_DIR
    from monovlm.serve.methods import terminal_methods
    from monovlm.serve.terminal import HELP, ChatSession, run_repl
    from monovlm.tokenizer import Tokenizer

    methods = terminal_methods(reduce, keep, decoding)  # a bad flag fails before the model loads
    folder = model or DEFAULT_MODEL_DIR
    vlm = EncoderFreeVLM.load(folder).eval()
    if visual_position_step is not None:
        vlm.set_visual_position_step(visual_position_step)
    tokenizer = Tokenizer.from_folder(folder)
    processor = Processor(tokenizer, vlm.config.vision, vlm.config.processor)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                              stop_ids=processor.stop_ids)
    session = ChatSession(vlm, processor, config, methods, system=system)
    for path in image or []:
        session.attach(path)  # ImageLoadError is a ValueError: the CLI prints it without a traceback
    if question is not None:  # one question, one answer (a PromptError is a ValueError: printed, exit code 2)
        for piece in session.ask(question):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"monovlm chat with {Path(folder).resolve().name}; {HELP}", file=sys.stderr)
    run_repl(session, sys.stdin, sys.stdout, sys.stderr, prompt="> " if interactive else "")


def serve(
    model: Path | None = None,
    /,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "cpu",
    max_batch: int = 16,
    max_queue: int = 64,
    max_body_mb: float = 10.0,
    max_images: int = 8,
    max_image_pixels: int = 25_000_000,
    max_request_pixels: int = 64_000_000,
    max_decode_pixels: int = 32_000_000,
    max_buffered_mb: float = 256.0,
    max_connections: int = 256,
    header_timeout: int = 10,
    body_timeout: int = 60,
    max_tokens: int = 512,
    access_log: bool = True,
) -> None:
    """Serve a VLM over HTTP: an OpenAI-compatible /v1/chat/completions (text and inline images, streaming), /v1/models,
    /health, and a web page at / to ask about an image. Binds to the loopback address unless --host says otherwise.
    A request may choose visual token reduction and a decoding strategy in its "monovlm" field, e.g.
    {"monovlm": {"reduction": "fastv", "keep": 0.5, "decoding": "vcd"}} (see monovlm/serve/methods.py).
    Memory above the model is bounded by the limits: request bytes <= --max-buffered-mb, images being decoded <=
    --max-decode-pixels x 34 bytes at worst (float TIFF; ~10 for RGB PNG / JPEG), so the default 32 MP takes at most
    ~1.1 GB (~320 MB for RGB). A client that stalls is cut off after --header-timeout / --body-timeout seconds.

    Args:
        model: a monovlm model folder (default: the shipped tiny model)
        host: address to bind (0.0.0.0 exposes the server to the network: set an API key then)
        port: TCP port
        api_key: require 'Authorization: Bearer KEY' on /v1 (None: the MONOVLM_API_KEY environment variable, if set)
        device: cpu or cuda
        max_batch: most requests generated together in one batch
        max_queue: most requests waiting for the model; more get 429 with Retry-After
        max_body_mb: largest request body in MiB (base64 images included)
        max_images: most images in one request
        max_image_pixels: largest image (width x height of the file, checked before decoding)
        max_request_pixels: most pixels of all of one request's images together (checked before decoding)
        max_decode_pixels: most image pixels decoded at once, all requests together (>= max_image_pixels)
        max_buffered_mb: most MiB of request bodies (then their image files, until decoded) held at once, all requests
        max_connections: most open connections; one more is answered 429 and closed
        header_timeout: seconds a request's headers may take to arrive; then 408 and the connection closes
        body_timeout: seconds a request's body may take after its headers; then 408 and the connection closes
        max_tokens: most tokens one answer may ask for
        access_log: log every request
    """
    import os

    from monovlm.serve.app import create_app, load_served_model, run_server
    from monovlm.serve.limits import Limits

    if max_body_mb <= 0:
        raise ValueError(f"--max-body-mb {max_body_mb} must be positive")
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20), max_images=max_images, max_image_pixels=max_image_pixels,
                    max_tokens=max_tokens, default_max_tokens=min(128, max_tokens), max_batch=max_batch,
                    max_queue=max_queue, max_request_pixels=max_request_pixels, max_decode_pixels=max_decode_pixels,
                    max_buffered_bytes=int(max_buffered_mb * 2**20), max_connections=max_connections,
                    header_timeout_s=header_timeout, body_timeout_s=body_timeout)
    key = api_key or os.environ.get("MONOVLM_API_KEY") or None
    served = load_served_model(model, device=device)
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"warning: serving on {host} without an API key: anyone who can reach it can use it", file=sys.stderr)
    print(f"serving {served.name} at http://{host}:{port}/ (API: /v1/chat/completions)", file=sys.stderr)
    run_server(create_app(served, limits, key), host=host, port=port, access_log=access_log)
