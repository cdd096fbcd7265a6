"""`raycap.models.vlm`: any HF vision-language model as a raycap captioner, on tiny random models of six
families built offline (a locally trained BPE tokenizer with each family's special tokens, the image processors'
code defaults at 32 px): LLaVA, Idefics3, SmolVLM (with a chat template), Qwen2-VL, PaliGemma and Gemma 3.

Per family: greedy / sampled / beam captions for two images (the same tokens with and without the KV cache, and
their decode-time log-probs equal to teacher forcing); teacher-forced log-probs equal to a manual forward of the
HF model on the processor's own inputs (pixels and all) with only the caption tokens summed, and different for a
different caption; one optimizer step moves only the LoRA adapters (and the projector when it trains), never
the vision tower; save_pretrained -> the captioner registry's loader gives identical log-probs; the merged
export loads with `AutoModelForImageTextToText` and scores like the LoRA model.
"""
from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from raycap.models import lora
from raycap.models.bpe import train_bpe
from raycap.models.tokenizers import encode
from raycap.models.vlm import VlmCaptioner, VlmCaptionerConfig

CORPUS = ["a red square on a blue circle", "a small green triangle left of a big square", "A picture of",
          "two shapes: a yellow circle and a purple square", "Describe the image."] * 20
CAPTIONS = ["a red square on a blue circle", "a small green triangle"]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def tokenizer(specials: list[str]):
    tok = train_bpe(CORPUS, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def text_config(cls, tok, **kw):
    return cls(**SMALL, num_key_value_heads=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def llava():
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = tokenizer(["<image>"])
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**SMALL, image_size=32, patch_size=8),
                         text_config=text_config(LlamaConfig, tok), image_token_id=processor.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config), processor, {"prompt": "A picture of"}


def idefics3():
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlamaConfig)
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tok = tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                    max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4)  # (32/8)^2 / 2^2
    config = Idefics3Config(vision_config=Idefics3VisionConfig(**SMALL, image_size=32, patch_size=8),
                            text_config=text_config(LlamaConfig, tok), scale_factor=2,
                            image_token_id=processor.image_token_id)
    return Idefics3ForConditionalGeneration(config), processor, {"prompt": "A picture of", "image_size": 32}


def qwen2_vl():
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    tok = tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    images = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                   max_pixels=32 * 32)
    videos = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)  # the processor wants one
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos)
    ids = tok.convert_tokens_to_ids
    text = text_config(Qwen2VLTextConfig, tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [4, 2, 2]})
    vision = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                                 spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    prompt = "<|vision_start|><|image_pad|><|vision_end|>A picture of"
    return Qwen2VLForConditionalGeneration(config), processor, {"prompt": prompt, "image_size": 32}


def paligemma():
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    tok = tokenizer([])
    images = SiglipImageProcessor(size={"height": 32, "width": 32})
    images.image_seq_length = 16  # (32/8)^2
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    text = GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PaliGemmaConfig(vision_config=SiglipVisionConfig(**SMALL, image_size=32, patch_size=8, projection_dim=32),
                             text_config=text, image_token_index=processor.image_token_id, projection_dim=32)
    return PaliGemmaForConditionalGeneration(config), processor, {"prompt": "caption en"}


SMOLVLM_TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
                    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")  # SmolVLM's, in short


def smolvlm():
    """SmolVLM (Idefics3's architecture, its own processor) with a chat template and <end_of_utterance> as a
    generation stop token, as the released checkpoints have them."""
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor)
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    tok = tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>"])
    images = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                   max_image_size={"longest_edge": 32})
    processor = SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                 image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**SMALL, image_size=32, patch_size=8),
                           text_config=text_config(LlamaConfig, tok), scale_factor=2,
                           image_token_id=processor.image_token_id)
    model = SmolVLMForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    return model, processor, {"prompt": "Describe the image."}


def gemma3():
    """Gemma 3: its processor reads the image tokens from the tokenizer's named special tokens, marks them in
    `token_type_ids` (1: image, attended both ways) and the projector pools the tower's patches."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              PreTrainedTokenizerFast, SiglipVisionConfig)
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    specials = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    base = tokenizer(list(specials.values()))
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token,
                                  bos_token=base.bos_token, pad_token=base.pad_token, unk_token=base.unk_token,
                                  extra_special_tokens=specials)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=tok, image_seq_length=4)
    ids = tok.convert_tokens_to_ids
    text = Gemma3TextConfig(**SMALL, num_key_value_heads=1, head_dim=16, vocab_size=len(tok), sliding_window=16,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**SMALL, image_size=32, patch_size=8),
                          mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
                          eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    return Gemma3ForConditionalGeneration(config), processor, {"prompt": "A picture of"}


FAMILIES = {"llava": llava, "idefics3": idefics3, "smolvlm": smolvlm, "qwen2_vl": qwen2_vl, "paligemma": paligemma,
            "gemma3": gemma3}


@functools.lru_cache(maxsize=None)
def saved_base(family: str, tmp_root: str) -> str:
    """The family's tiny random model, built once (seed 0) and saved as a raycap VLM captioner directory."""
    torch.manual_seed(0)
    model, processor, settings = FAMILIES[family]()
    tok = processor.tokenizer
    config = VlmCaptionerConfig(max_new_tokens=6, pad_token_id=tok.pad_token_id, **settings)
    path = f"{tmp_root}/{family}"
    VlmCaptioner(model.eval(), processor, config).save_pretrained(path)
    return path


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def captioner(family, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "vlm_bases"
    return VlmCaptioner.from_pretrained(saved_base(family, str(root))).eval()


def images():
    g = torch.Generator().manual_seed(1)
    shapes = [(28, 20), (20, 28)]  # two aspect ratios: the rows are one shape all the same
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in shapes]


def caption_tokens(cap, texts=CAPTIONS):
    return encode(cap.hf_processor.tokenizer, [" " + t for t in texts])


def manual_log_prob(cap, image, caption: str) -> float:
    """Sum of the caption tokens' log-probs from the HF model run on what the processor itself makes of the
    prompt followed by the caption (pixels, image tokens, the type rows; PaliGemma: the caption as its suffix):
    no raycap code between the model and the numbers."""
    p = cap.hf_processor
    ids, _ = encode(p.tokenizer, [" " + caption])
    image = cap.processor.prepare([image])[0]
    if "suffix" in p.__call__.__code__.co_varnames:  # PaliGemma: the suffix gets the eos and the causal mask
        inputs = p(text=[cap.prompt_text()], images=[image], suffix=[" " + caption], return_tensors="pt")
    else:
        inputs = p(text=[cap.prompt_text() + " " + caption + p.tokenizer.eos_token], images=[image],
                   return_tensors="pt")
    inputs.pop("labels", None)
    T = ids.shape[1]
    assert inputs["input_ids"][0, -T:].tolist() == ids[0].tolist()  # the very tokens raycap scores
    with torch.no_grad():
        logits = cap.model(**inputs, use_cache=False).logits[0].float()
    logits[:, cap.placeholder_ids] = float("-inf")  # the policy's vocabulary has no image placeholders
    logp = torch.log_softmax(logits[-T - 1:-1], -1)
    return float(logp.gather(1, ids[0][:, None]).sum())


def test_prompt_stops_and_image_rows(captioner, family):
    """The prompt the model sees, what ends a caption, what can never be one, and the pixel rows as raycap's
    per-batch `ImageRows` reads them (through `captioner.processor`, picklable) and a deep copy (the reference
    policy) scores them alike."""
    import copy
    import pickle

    from raycap.inputs import ImageRows

    cap = captioner
    tok = cap.hf_processor.tokenizer
    text = cap.prompt_text()
    assert cap.config.prompt in text
    ids = cap._text["input_ids"][0].tolist()
    assert set(cap.placeholder_ids) & set(ids)  # the image is in the prompt ...
    assert tok.eos_token_id in cap.stop_ids and not set(cap.placeholder_ids) & set(cap.stop_ids)
    if family == "smolvlm":  # ... through the chat template, and the turn's end stops a caption
        assert text.startswith("<|im_start|>User:<image>") and text.endswith("<end_of_utterance>\nAssistant:")
        assert tok.convert_tokens_to_ids("<end_of_utterance>") in cap.stop_ids

    class Source:
        name, imgs = "two", images()

        def __len__(self):
            return 2

        def image(self, i):
            return self.imgs[i]

    rows = ImageRows(Source(), pickle.loads(pickle.dumps(cap.processor)))
    assert torch.equal(rows[torch.tensor([1, 0])], cap.pixels(Source.imgs[::-1]))
    assert torch.equal(rows[1:].to("cpu"), cap.pixels(Source.imgs[1:]))
    tokens, lengths = caption_tokens(cap)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(cap).log_probs(rows[[0, 1]], tokens, lengths),
                                   cap.log_probs(cap.pixels(Source.imgs), tokens, lengths), atol=0, rtol=0)
    from raycap.supervised.captioner import caption_embeddings  # evaluation's decode: chunks of rows -> text

    texts = caption_embeddings(cap, tok, cap.pixels(Source.imgs), batch_size=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_a_processor_of_varying_shapes_needs_image_size(tmp_path_factory):
    """Qwen2-VL's processor keeps an image's aspect (its patch grid, so its number of image tokens, varies):
    without image_size the captioner refuses to start rather than score one image with another's grid."""
    from raycap.errors import UserError

    base = saved_base("qwen2_vl", str(tmp_path_factory.getbasetemp() / "vlm_bases"))
    with pytest.raises(UserError, match="set the captioner's image_size"):
        VlmCaptioner.from_pretrained(base, image_size=None)


def test_greedy_sampled_and_beam_captions(captioner):
    cap = captioner
    rows = cap.pixels(images())
    assert rows.shape[0] == 2 and rows.dtype == torch.float32
    greedy = cap.generate(rows, "greedy")
    assert greedy.tokens.shape[0] == 2 and (greedy.lengths >= 1).all() and (greedy.lengths <= 6).all()
    assert int(greedy.tokens.max()) < cap.model.get_output_embeddings().out_features
    no_cache = cap.generate(rows, "greedy", use_cache=False)
    assert no_cache.tolist() == greedy.tolist()
    with torch.no_grad():
        scored = cap.log_probs(rows, greedy.tokens, greedy.lengths)
    torch.testing.assert_close(scored, greedy.logprobs, atol=1e-4, rtol=0)
    sampled = cap.generate(rows, "sample", generator=torch.Generator().manual_seed(0), num_samples=2)
    again = cap.generate(rows, "sample", generator=torch.Generator().manual_seed(0), num_samples=2)
    assert sampled.tokens.shape[0] == 4 and sampled.tolist() == again.tolist()
    with torch.no_grad():  # num_samples layout: 2 image rows score 4 captions
        torch.testing.assert_close(cap.log_probs(rows, sampled.tokens, sampled.lengths), sampled.logprobs,
                                   atol=1e-4, rtol=0)
    beam = cap.generate(rows, "beam", num_beams=2, num_samples=2)
    assert beam.tokens.shape[0] == 4


def test_log_probs_are_the_caption_tokens_of_a_manual_forward(captioner):
    cap = captioner
    imgs = images()
    tokens, lengths = caption_tokens(cap)
    with torch.no_grad():
        lp = cap.log_probs(cap.pixels(imgs), tokens, lengths, reduction="sum")
    manual = torch.tensor([manual_log_prob(cap, im, c) for im, c in zip(imgs, CAPTIONS)])
    torch.testing.assert_close(lp, manual, atol=1e-4, rtol=0)
    other, other_len = caption_tokens(cap, ["a purple circle", "two yellow shapes"])
    with torch.no_grad():
        assert (cap.log_probs(cap.pixels(imgs), other, other_len, reduction="sum") - lp).abs().min() > 1e-3


@pytest.mark.parametrize("train_projector", [False, True], ids=["lora", "lora+projector"])
def test_lora_step_save_load_and_merged_export(family, train_projector, tmp_path, tmp_path_factory, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from raycap.models import vlm
    from raycap.models.loading import CAPTIONERS, CaptionerKind, load_captioner, load_captioner_model

    assert CAPTIONERS["vlm"] == CaptionerKind(vlm.CONFIG_NAME, VlmCaptioner, "vision-language model")
    base = saved_base(family, str(tmp_path_factory.getbasetemp() / "vlm_bases"))
    cap = VlmCaptioner.from_pretrained(base, train_projector=train_projector)
    cap.add_lora(r=4, alpha=8, seed=0)
    assert lora.has_lora(cap.lora_target)
    rows = cap.pixels(images())
    tokens, lengths = caption_tokens(cap)
    before = {n: p.detach().clone() for n, p in cap.model.named_parameters()}
    frozen = set(cap.frozen_parameters())
    trainable = {n for n, p in cap.model.named_parameters() if p.requires_grad}
    projector = {n for n in trainable if lora.LORA_MARK not in n}
    assert trainable and all(lora.LORA_MARK in n for n in trainable - projector)
    assert bool(projector) == train_projector and not (frozen & trainable)
    cap.train()
    assert cap.lora_target.training and not any(m.training for m in cap.image_side if m is not cap.projector)
    assert all(m.training == train_projector for m in cap.projector.modules())
    opt = torch.optim.Adam([p for p in cap.model.parameters() if p.requires_grad], lr=1e-2)
    loss = -cap.log_probs(rows, tokens, lengths, reduction="sum").sum()
    loss.backward()
    assert all(p.grad is None for n, p in cap.model.named_parameters() if n in frozen)
    opt.step()
    cap.eval()
    changed = {n for n, p in cap.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)
    assert bool(changed & projector) == train_projector
    assert not changed & frozen
    with torch.no_grad():
        lp = cap.log_probs(rows, tokens, lengths)

    cap.save_pretrained(tmp_path / "cap")
    loaded = load_captioner_model(tmp_path / "cap").eval()
    assert type(loaded) is VlmCaptioner and lora.has_lora(loaded.lora_target)
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(rows, tokens, lengths), lp)
    _, tok = load_captioner(tmp_path / "cap")  # the registry's (captioner, tokenizer) pair
    assert tok.convert_ids_to_tokens(int(tokens[0, 0])) == cap.hf_processor.tokenizer.convert_ids_to_tokens(
        int(tokens[0, 0]))

    cap.merge_and_save(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not lora.has_lora(merged) and type(merged) is type(cap.model)
    c = cap.config  # and as raycap opens an HF checkpoint: the export is one
    plain = VlmCaptioner.from_hf(str(tmp_path / "merged"), prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                                 image_size=c.image_size, stop_token_ids=c.stop_token_ids).eval()
    assert type(AutoProcessor.from_pretrained(tmp_path / "merged")) is type(cap.hf_processor)
    with torch.no_grad():
        torch.testing.assert_close(plain.log_probs(rows, tokens, lengths), lp, atol=1e-4, rtol=0)
    cap.merge_adapters()  # in place: the plain architecture again, scoring alike
    assert not lora.has_lora(cap.model)
    with torch.no_grad():
        torch.testing.assert_close(cap.log_probs(rows, tokens, lengths), lp, atol=1e-4, rtol=0)


def test_gumbel_soft_tokens_run_the_model_as_its_hard_tokens_and_reach_the_adapters(captioner):
    """The second method's decode on a VLM (`raycap.rl.gumbel`): the straight-through one-hots fed as embeddings
    give, step by step, the logits teacher forcing gives for the same hard tokens (the prompt, image and caption
    so far, cached); no image placeholder is emitted; a loss on the soft captions reaches the LoRA adapters and
    never the vision tower."""
    from raycap.rl.gumbel import gumbel_decode

    cap = captioner
    cap.add_lora(r=4, alpha=8, seed=0)
    rows = cap.pixels(images())
    eos = cap.hf_processor.tokenizer.eos_token_id
    soft = gumbel_decode(cap, rows, eos, tau=1.0, generator=torch.Generator().manual_seed(0))
    again = gumbel_decode(cap, rows, eos, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(soft.tokens, again.tokens)
    assert not set(soft.tokens.flatten().tolist()) & set(cap.placeholder_ids)
    T = soft.logits.shape[1]
    with torch.no_grad():
        forced = cap.logits(rows, soft.tokens[:, :T])
    for i, n in enumerate(soft.lengths.clamp(max=T).tolist()):
        torch.testing.assert_close(soft.logits[i, :n].detach(), forced[i, :n], atol=1e-4, rtol=1e-4)
    first, past = cap.soft_start(rows)  # a later step's logits are differentiable in the soft token fed to it
    fed = torch.nn.functional.one_hot(first.argmax(-1), first.shape[-1]).float().requires_grad_(True)
    later, _ = cap.soft_step(fed, past)
    assert float(torch.autograd.grad(later.sum(), fed)[0].abs().sum()) > 0
    weights = torch.randn(soft.probs.shape[-1], generator=torch.Generator().manual_seed(1))
    (soft.probs * weights).sum().backward()
    grads = {n: p.grad for n, p in cap.model.named_parameters() if p.grad is not None}
    assert any(lora.LORA_MARK in n and float(g.abs().sum()) > 0 for n, g in grads.items())
    assert not set(grads) & set(cap.frozen_parameters())
