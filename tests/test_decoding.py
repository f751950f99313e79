"""Decoding strategies (VCD, debias calibration, DAMRO) and generate's `strategy=` hook, on tiny random VLMs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from monovlm.config import DecoderConfig, ProcessorConfig, VisionConfig, VLMConfig
from monovlm.data.processor import Processor
from monovlm.infer import generate as generate_module
from monovlm.infer.decoding import (
    DAMRO,
    VCD,
    BlankImage,
    ContrastiveDecoding,
    DebiasCalibration,
    NoImage,
    UnkImage,
    add_diffusion_noise,
    calibrate,
    calibrated_logits,
    contrast,
    diffusion_keep_scale,
    label_token_ids,
    plausible_tokens,
    select_outliers,
)
from monovlm.infer.generate import GenerationConfig, generate, left_pad, stream_text
from monovlm.infer.sampling import sample_next
from monovlm.model.decoder import Decoder
from monovlm.model.kv_cache import KVCache
from monovlm.model.masks import position_ids_from_segments
from monovlm.model.vlm import EncoderFreeVLM
from monovlm.tokenizer import add_image_special_tokens, train_bpe_tokenizer

VISION = VisionConfig(embedder="eve", patch_size=4, merge=2, embedder_width=32, max_pixels=64 * 64)  # 8 px / token


@pytest.fixture(scope="module")
def tokenizer():
    words = ["is there a red circle", "blue square", "in the image", "how many shapes", "yes", "no", "Yes", "No"]
    return train_bpe_tokenizer([" ".join(words)] * 20, vocab_size=400)


def build(tokenizer, seed=0, **decoder_overrides):
    torch.manual_seed(seed)
    settings = {"vocab_size": tokenizer.vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                "num_heads": 4, "num_kv_heads": 2, "initializer_range": 0.1}
    decoder = Decoder(DecoderConfig(**{**settings, **decoder_overrides}))
    add_image_special_tokens(tokenizer, decoder)
    config = VLMConfig(decoder=decoder.config, vision=VISION, processor=ProcessorConfig(template="chatml"))
    model = EncoderFreeVLM(config).eval()
    model.decoder.load_state_dict(decoder.state_dict())
    if model.config.decoder.has_experts:
        model.decoder.init_experts_from_text()
        with torch.no_grad():  # move the experts apart so that routing matters
            for name, parameter in model.decoder.named_parameters():
                if "vision" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.05)
    return model, Processor(tokenizer, VISION, config.processor)


@pytest.fixture(scope="module")
def vlm(tokenizer):
    return build(tokenizer)


def picture(size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


QUESTIONS = ["is there a red circle in the image", "how many"]


def prompts_of(processor, questions=QUESTIONS, sizes=(32, 32)):
    ids, tensors = [], []
    for index, (question, size) in enumerate(zip(questions, sizes)):
        prompt, images = processor.prompt(question, [picture(size, seed=index)])
        ids.append(prompt)
        tensors += images
    return ids, tensors


@pytest.fixture
def sampler_inputs(monkeypatch):
    """The logits generate hands to the sampler, step by step."""
    seen = []

    def recording_sampler(logits, settings, generator):
        seen.append(logits.clone())
        return sample_next(logits, settings, generator)

    monkeypatch.setattr(generate_module, "sample_next", recording_sampler)
    return seen


def keep_run(strategy):
    """Record the per-generation run a strategy starts, to look inside it after `generate`."""
    runs = []
    start = strategy.start
    strategy.start = lambda *args: runs.append(start(*args)) or runs[-1]
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# the mixing rule


def test_contrast_is_one_plus_alpha_main_minus_alpha_aux_on_a_hand_checked_case():
    main = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    aux = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    assert contrast(main, aux, alpha=1.0, beta=0.0).tolist() == [[4.0, 1.0, -2.0, -6.0]]
    assert contrast(main, aux, alpha=0.5, beta=0.0).tolist() == [[3.0, 1.0, -1.0, -4.5]]
    # beta = 0.3: p(y) >= 0.3 p_max  <=>  l(y) >= 2 + log 0.3 = 0.796: tokens 0 and 1 stay
    assert contrast(main, aux, alpha=1.0, beta=0.3).tolist() == [[4.0, 1.0, -math.inf, -math.inf]]


def test_plausibility_cutoff_masks_exactly_the_tokens_below_beta_times_max_prob():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)) * 3
    probs = logits.softmax(dim=-1)
    for beta in (0.01, 0.1, 0.5):
        expected = probs >= beta * probs.max(dim=-1, keepdim=True).values
        assert torch.equal(plausible_tokens(logits, beta), expected)
        assert 0 < int(expected.sum()) < expected.numel()  # the case really cuts something and keeps something
    only_max = plausible_tokens(logits, 1.0)
    assert torch.equal(only_max.nonzero()[:, 1], logits.argmax(dim=-1))
    assert bool(plausible_tokens(logits, 0.0).all())


def test_cutoff_uses_the_unmixed_logits():
    main = torch.tensor([[3.0, 0.0]])  # token 1 is implausible under main at beta 0.1 (p ratio e^-3 = 0.05)
    aux = torch.tensor([[10.0, -10.0]])  # ... although the mix would make it the favourite
    mixed = contrast(main, aux, alpha=1.0, beta=0.1)
    assert mixed[0, 1] == -math.inf and math.isfinite(mixed[0, 0])


def test_bad_settings_are_refused(vlm):
    model, processor = vlm
    with pytest.raises(ValueError, match="alpha"):
        VCD(alpha=-1)
    with pytest.raises(ValueError, match="beta"):
        DAMRO(beta=2)
    with pytest.raises(ValueError, match="k="):
        DAMRO(k=0)
    with pytest.raises(ValueError, match="noise_step"):
        diffusion_keep_scale(1000)
    with pytest.raises(ValueError, match="labels"):
        DebiasCalibration({"yes": [1]})
    block, image = processor.image_block(picture())  # a prompt that is only an image ("plain" template)
    with pytest.raises(ValueError, match="no text besides its image"):
        NoImage().build(model, torch.tensor([block]), None, {"images": [image]})
    with pytest.raises(ValueError, match="needs a VLM"):
        DAMRO().start(Decoder(DecoderConfig(vocab_size=32)), torch.tensor([[1, 2]]), None, None, 4)


# ---------------------------------------------------------------------------------------------------------------------
# the generate hook


def plain_loop(model, input_ids, attention_mask, config, prefill_inputs):
    """The generation loop as it was before the strategy hook (no stop handling needed here): the logits that reach
    the sampler at each step, and the sampled tokens."""
    cache = KVCache.for_model(model, input_ids.shape[0], input_ids.shape[1] + config.max_new_tokens)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, last_only=True,
                       **prefill_inputs)[:, -1]
        seen, tokens = [], []
        for step in range(config.max_new_tokens):
            seen.append(logits)
            tokens.append(sample_next(logits, config.sampling, generator))
            if step + 1 < config.max_new_tokens:
                logits = model(input_ids=tokens[-1][:, None], cache=cache, last_only=True)[:, -1]
    return seen, torch.stack(tokens, dim=1)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "top_p": 0.9, "seed": 3}])
def test_strategy_none_is_bitwise_the_plain_loop(vlm, sampler_inputs, sampling):
    model, processor = vlm
    ids, images = prompts_of(processor)
    config = GenerationConfig(max_new_tokens=6, **sampling)
    seen = sampler_inputs
    results = generate(model, ids, config, prefill_inputs={"images": images}, strategy=None)
    input_ids, attention_mask = left_pad(ids)
    expected_logits, expected_tokens = plain_loop(model, input_ids, attention_mask, config, {"images": images})
    assert len(seen) == len(expected_logits) == 6
    assert all(torch.equal(a, b) for a, b in zip(seen, expected_logits))
    assert [r.token_ids for r in results] == expected_tokens.tolist()


def test_vcd_with_alpha_zero_is_plain_decoding(vlm):
    model, processor = vlm
    ids, images = prompts_of(processor)
    inputs = {"images": images}
    greedy = GenerationConfig(max_new_tokens=8)
    plain = [r.token_ids for r in generate(model, ids, greedy, prefill_inputs=inputs)]
    # greedy: the argmax always passes the cut-off, so any beta gives plain decoding
    assert [r.token_ids for r in generate(model, ids, greedy, prefill_inputs=inputs, strategy=VCD(alpha=0))] == plain
    # sampling: with beta = 0 too the logits are the main ones exactly, so the same seed samples the same tokens
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.5, seed=7)
    plain_sampled = [r.token_ids for r in generate(model, ids, sampled, prefill_inputs=inputs)]
    vcd_sampled = generate(model, ids, sampled, prefill_inputs=inputs, strategy=VCD(alpha=0, beta=0))
    assert [r.token_ids for r in vcd_sampled] == plain_sampled


def test_sampler_applies_after_the_strategy(vlm):
    # beta = 1 keeps only the main argmax, so even hot sampling must reproduce plain greedy decoding
    model, processor = vlm
    ids, images = prompts_of(processor)
    greedy = [r.token_ids for r in generate(model, ids, GenerationConfig(max_new_tokens=8),
                                            prefill_inputs={"images": images})]
    hot = GenerationConfig(max_new_tokens=8, temperature=5.0, top_k=50, seed=1)
    assert [r.token_ids for r in generate(model, ids, hot, prefill_inputs={"images": images},
                                          strategy=VCD(alpha=1.0, beta=1.0))] == greedy
    assert [r.token_ids for r in generate(model, ids, hot, prefill_inputs={"images": images})] != greedy


def test_vcd_logits_mix_the_image_and_noised_image_forwards(vlm, sampler_inputs):
    model, processor = vlm
    ids, images = processor.prompt(QUESTIONS[0], [picture()])
    strategy = VCD(alpha=0.7, beta=0.05, noise_step=500, seed=11)
    runs = keep_run(strategy)
    seen = sampler_inputs
    tokens = generate(model, [ids], GenerationConfig(max_new_tokens=3), prefill_inputs={"images": images},
                      strategy=strategy)[0].token_ids
    assert len(runs) == 1 and len(seen) == 3
    noised = [add_diffusion_noise(image, 500, seed=11) for image in images]
    with torch.no_grad():
        for step in range(3):  # uncached full forwards over the prompt plus the tokens generated so far
            sequence = torch.tensor([ids + tokens[:step]])
            main = model(sequence, images)[:, -1]
            aux = model(sequence, noised)[:, -1]
            expected = (1.7 * main - 0.7 * aux).masked_fill(~plausible_tokens(main, 0.05), -math.inf)
            finite = torch.isfinite(expected)
            assert torch.equal(finite, torch.isfinite(seen[step]))
            assert torch.allclose(seen[step][finite], expected[finite], atol=1e-4)
            assert not torch.allclose(main, aux, atol=1e-3)  # the noise really changed the contrast branch


def test_diffusion_noise_follows_the_vcd_schedule():
    keep, scale = diffusion_keep_scale(500)
    assert keep == pytest.approx(0.863, abs=1e-3) and scale == pytest.approx(0.505, abs=1e-3)
    keep_999, scale_999 = diffusion_keep_scale(999)
    assert keep_999 == pytest.approx(0.285, abs=1e-3) and scale_999 == pytest.approx(0.959, abs=1e-3)
    image = torch.rand(3, 64, 64) * 2 - 1
    noised = add_diffusion_noise(image, 500, seed=0)
    noise = (noised - keep * image) / scale
    assert abs(float(noise.mean())) < 0.05 and float(noise.std()) == pytest.approx(1.0, abs=0.05)
    # the noise depends on (seed, pixels): equal for the same image, different for another seed or image
    assert torch.equal(add_diffusion_noise(image, 500, seed=0), noised)
    assert not torch.equal(add_diffusion_noise(image, 500, seed=1), noised)
    other = image.clone()
    other[0, 0, 0] += 0.5
    assert not torch.allclose(add_diffusion_noise(other, 500, seed=0)[1:], noised[1:])


# ---------------------------------------------------------------------------------------------------------------------
# debias calibration


class TinyTokenizer:
    vocab = ("a", "yes", " Yes", "no", "NO ", "yess", "b")
    vocab_size = len(vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_label_token_ids_follow_the_lowercase_strip_rule():
    assert label_token_ids(TinyTokenizer()) == {"yes": [1, 2], "no": [3, 4]}
    with pytest.raises(ValueError, match="maybe"):
        label_token_ids(TinyTokenizer(), ("yes", "maybe"))


def paper_calibration(p_main, priors):
    """`eval_pope_calibrate.py`, individual mode, diagonal_W, transcribed with numpy."""
    gen_answer = np.asarray(p_main, dtype=np.float64)
    gen_answer = gen_answer / np.sum(gen_answer)
    all_p_y = sum(np.asarray(p, dtype=np.float64) for p in priors)
    p_cf = all_p_y / np.sum(all_p_y)
    p_cf = [x + 1e-4 for x in p_cf]
    W = np.linalg.inv(np.identity(len(p_cf)) * p_cf)
    b = np.zeros([len(p_cf), 1])
    calibrated = np.matmul(W, np.expand_dims(gen_answer, axis=-1)) + b
    return (calibrated / np.sum(calibrated))[:, 0]


@pytest.mark.parametrize("priors", [(NoImage(),), (NoImage(), UnkImage(0))])
def test_debias_calibration_divides_out_the_no_image_prior_as_the_paper_does(vlm, sampler_inputs, priors):
    model, processor = vlm
    ids, images = processor.prompt(QUESTIONS[0], [picture()])
    with torch.no_grad():
        main = model(torch.tensor([ids]), images)[0, -1]
    top = main.argsort(descending=True).tolist()
    labels = {"yes": [top[3], top[0]], "no": [top[1]]}  # a two-token label and a one-token one
    strategy = DebiasCalibration(labels, prior=priors)
    seen = sampler_inputs
    result = generate(model, [ids], GenerationConfig(max_new_tokens=2), prefill_inputs={"images": images},
                      strategy=strategy)[0]

    image_ids = {processor.image_id, processor.image_start_id, processor.image_end_id}
    no_image = torch.tensor([[i for i in ids if i not in image_ids]])
    unk = torch.tensor([[0 if i == processor.image_id else i for i in ids]])
    with torch.no_grad():
        prior_logits = {"NoImage": model(no_image)[0, -1], "UnkImage": model(unk)[0, -1]}
        second_step = model(torch.tensor([ids + result.token_ids[:1]]), images)[:, -1]

    def label_probs(logits):
        probs = logits.double().softmax(dim=-1)
        return [float(probs[ids_].sum()) for ids_ in labels.values()]

    q = paper_calibration(label_probs(main), [label_probs(prior_logits[type(p).__name__]) for p in priors])
    p_main = np.asarray(label_probs(main)) / sum(label_probs(main))
    assert not np.allclose(q, p_main, atol=1e-3)  # the prior is far from uniform: calibration really moves q
    first = seen[0][0]
    # all the mass sits on each label's most likely form: top[0] for yes, top[1] for no; everything else is -inf
    assert torch.isfinite(first).nonzero().flatten().tolist() == sorted([top[0], top[1]])
    assert first[[top[0], top[1]]].softmax(dim=-1).double().numpy() == pytest.approx(q, abs=1e-5)
    assert result.token_ids[0] == (top[0] if q[0] > q[1] else top[1])
    assert torch.allclose(seen[1], second_step, atol=1e-4)  # later steps are left alone


def test_calibration_without_restriction_keeps_other_tokens_and_redistributes_label_mass():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    label_ids = [torch.tensor([0]), torch.tensor([1, 2])]
    prior = [torch.tensor([[math.log(0.8), math.log(0.2)]])]
    log_p = torch.stack([logits.log_softmax(-1)[:, 0], logits.log_softmax(-1)[:, 1:3].logsumexp(-1)], dim=-1)
    log_q = calibrate(log_p, prior, epsilon=0.0)
    p = log_p.exp() / log_p.exp().sum()
    q = p / torch.tensor([0.8, 0.2])
    assert torch.allclose(log_q.exp(), q / q.sum(), atol=1e-6)
    out = calibrated_logits(logits, label_ids, log_q, restrict=False).softmax(dim=-1)
    probs = logits.softmax(dim=-1)
    assert torch.allclose(out[0, 3], probs[0, 3])  # a non-label token keeps its probability
    mass = probs[0, :3].sum()
    assert torch.allclose(out[0, [0, 1]], mass * log_q.exp()[0], atol=1e-6) and out[0, 2] == 0


# ---------------------------------------------------------------------------------------------------------------------
# DAMRO


class AttentionRecorder:
    """Wraps SDPA and, the first time `layer` runs (the main prefill), records its explicit attention probabilities
    (B, H, T, S)."""

    def __init__(self, monkeypatch, layer_module):
        self.active, self.probs = False, None
        original = F.scaled_dot_product_attention

        def recording(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
            if self.active and self.probs is None:
                k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                scores = q @ k_full.transpose(-1, -2) / math.sqrt(q.shape[-1])
                if attn_mask is not None:
                    scores = scores.masked_fill(~attn_mask, -math.inf)
                if is_causal:
                    scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
                self.probs = scores.softmax(dim=-1)
            return original(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        layer_module.register_forward_pre_hook(lambda *_: setattr(self, "active", True))
        layer_module.register_forward_hook(lambda *_: setattr(self, "active", False))


@pytest.mark.parametrize("experts", [{}, {"expert_norms": True, "expert_attention": True}])
def test_damro_attention_row_equals_the_model_attention(tokenizer, monkeypatch, experts):
    model, processor = build(tokenizer, seed=2, num_layers=3, **experts)
    ids, images = prompts_of(processor, sizes=(32, 16))  # two lengths: the shorter row is left-padded
    recorder = AttentionRecorder(monkeypatch, model.decoder.layers[1])
    strategy = DAMRO(layer=1, k=3)
    runs = keep_run(strategy)
    generate(model, ids, GenerationConfig(max_new_tokens=1), prefill_inputs={"images": images}, strategy=strategy)
    expected = recorder.probs[:, :, -1].mean(dim=1)  # the last token's row, averaged over heads: (B, T)
    assert torch.allclose(runs[0].scores, expected, atol=1e-5)
    # the outliers are the 3 best-scored patch tokens of each row
    input_ids, _ = left_pad(ids)
    vision = input_ids == model.image_token_id
    for row in range(2):
        chosen = runs[0].outliers[row].nonzero().flatten()
        assert len(chosen) == 3 and bool(vision[row, chosen].all())


def test_damro_picks_planted_outliers(tokenizer):
    # Layer 0 is set up by hand: every head's query is n_last·w, every key n_j·u, in the RoPE dimension pair with
    # the lowest frequency (rope_theta 1e9: the rotation is ~1e-6 rad), so the score of visual token j is
    # ∝ (w·n_last)(u·n_j). Visual tokens are orthogonal to u except the planted ones.
    model, processor = build(tokenizer, seed=3, rope_theta=1e9)
    ids, images = processor.prompt(QUESTIONS[0], [picture(32)])  # 4x4 grid: CLS, then 4 x (4 patches + SEP)
    hidden, heads, kv_heads, dim = 64, 4, 2, 16
    last = model.decoder.embed_tokens.weight[ids[-1]].detach()
    w = last / last.norm()
    u = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
    u = u - (u @ w) * w  # keep the query direction and the key direction apart
    u = u / u.norm()
    with torch.no_grad():
        weight = model.decoder.layers[0].attn.qkv_proj.weight
        weight[: (heads + kv_heads) * dim] = 0
        for head in range(heads):
            weight[head * dim + dim // 2 - 1] = 4 * w
        for head in range(kv_heads):
            weight[(heads + head) * dim + dim // 2 - 1] = 4 * u
    noise = torch.randn(21, hidden, generator=torch.Generator().manual_seed(6))
    tokens = noise - (noise @ u)[:, None] * u  # no component along u
    planted = {2: 6.0, 8: 5.0, 19: 4.0, 0: 9.0, 5: 8.0}  # grid tokens 2, 8, 19; CLS (0) and a separator (5)
    for index, strength in planted.items():
        tokens[index] += strength * u * noise[index].norm()
    model.embedder.register_forward_hook(lambda module, args, output: [tokens.to(output[0].dtype)])
    for candidates, k, expected in (("grid", 3, [2, 8, 19]), ("all", 5, [0, 2, 5, 8, 19])):
        strategy = DAMRO(layer=0, k=k, candidates=candidates)
        runs = keep_run(strategy)
        generate(model, [ids], GenerationConfig(max_new_tokens=1), prefill_inputs={"images": images},
                 strategy=strategy)
        visual_positions = (torch.tensor(ids) == model.image_token_id).nonzero().flatten()
        chosen = runs[0].outliers[0].nonzero().flatten()
        assert [int((visual_positions == c).nonzero()) for c in chosen] == expected


def test_damro_contrast_branch_sees_only_the_outliers_at_their_positions(tokenizer):
    model, processor = build(tokenizer, seed=4, expert_mlp=True)
    ids, images = prompts_of(processor, sizes=(32, 16))
    strategy = DAMRO(k=2)
    runs = keep_run(strategy)
    generate(model, ids, GenerationConfig(max_new_tokens=1), prefill_inputs={"images": images}, strategy=strategy)
    run = runs[0]
    input_ids, mask = left_pad(ids)
    positions = position_ids_from_segments(mask)
    with torch.no_grad():
        embeds, vision = model.embed(input_ids, images)
        for row in range(2):
            keep = (mask[row] != 0) & (~vision[row] | run.outliers[row])
            assert int((vision[row] & keep).sum()) == 2
            logits = model.decoder(inputs_embeds=embeds[row, keep][None], position_ids=positions[row, keep][None],
                                   vision_mask=vision[row, keep][None], last_only=True)[0, -1]
            assert torch.allclose(run.branch.logits[row], logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# batches


STRATEGIES = {
    "vcd": lambda labels: VCD(alpha=1.0, beta=0.1),
    "visual-debias": lambda labels: ContrastiveDecoding(NoImage(), alpha=1.0, beta=0.2),
    "blank": lambda labels: ContrastiveDecoding(BlankImage(), alpha=0.5, beta=0.1),
    "debias": lambda labels: DebiasCalibration(labels, prior=(NoImage(), UnkImage())),
    "damro": lambda labels: DAMRO(alpha=0.5, beta=0.1, k=3),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_left_padded_batch_of_two_equals_one_by_one(vlm, tokenizer, name):
    model, processor = vlm
    ids, images = prompts_of(processor, sizes=(32, 16))
    assert len(ids[0]) != len(ids[1])
    labels = label_token_ids(tokenizer, ("yes", "no"))
    config = GenerationConfig(max_new_tokens=6)
    batched = generate(model, ids, config, prefill_inputs={"images": images}, strategy=STRATEGIES[name](labels))
    for row in range(2):
        single = generate(model, [ids[row]], config, prefill_inputs={"images": [images[row]]},
                          strategy=STRATEGIES[name](labels))[0]
        assert batched[row].token_ids == single.token_ids


def test_stream_text_takes_the_strategy_too(vlm, tokenizer):
    model, processor = vlm
    ids, images = prompts_of(processor)
    config = GenerationConfig(max_new_tokens=6)
    strategy = DAMRO(k=2)
    expected = [r.text for r in generate(model, ids, config, tokenizer, prefill_inputs={"images": images},
                                         strategy=strategy)]
    streamed = ["", ""]
    for deltas in stream_text(model, ids, tokenizer, config, prefill_inputs={"images": images}, strategy=strategy):
        for row, delta in enumerate(deltas):
            streamed[row] += delta
    assert streamed == expected


def test_select_outliers_respects_candidates_and_short_rows():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.1, 0.7]])
    candidates = torch.tensor([[False, True, True, True], [False, False, False, True]])
    chosen = select_outliers(scores, candidates, k=2)
    assert chosen.tolist() == [[False, False, True, True], [False, False, False, True]]
