"""UMT5 prompt text rules and encoding (docs/official_behaviour.md §3.7, §4.4; docs/wan_qwen.md §3).

References: hand-written expected strings transcribed from the official
pipeline.py code paths, diffusers' Wan ``prompt_clean``, and a tiny random
transformers UMT5EncoderModel run directly.
"""

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.text_encoder import (
    UMT5TextEncoder,
    negative_prompt,
    pad_context,
    prompt_clean,
    renderer_system_prompt,
    t5_negative_text,
    t5_positive_text,
)

T2V_SYSTEM = "You are a helpful assistant specialized in text-to-video generation."
V2V_SYSTEM = "You are a helpful assistant specialized in video editing."
DEFAULT_SYSTEM = "You are a helpful assistant."
ZH_NEG = negative_prompt("default_zh")


# --------------------------------------------------------------------------- helpers

def make_tokenizer():
    """An offline T5-style tokenizer: Unigram + Metaspace, pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -1.0), ("▁cat", -1.5),
             ("▁dog", -1.5), ("s", -3.0), ("▁runs", -2.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def make_model():
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=16, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    torch.manual_seed(0)
    return UMT5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def encoder():
    return UMT5TextEncoder(make_model(), make_tokenizer())


# --------------------------------------------------------------------------- prompt_clean

@pytest.mark.parametrize("raw, expected", [
    ("  a\t\tcat \n\n runs  ", "a cat runs"),                      # whitespace collapse + strip
    ("Tom &amp;amp; Jerry &lt;3", "Tom & Jerry <3"),                # nested HTML entities
    ("The cat doesnâ€™t run", "The cat doesn't run"),               # mojibake repaired by ftfy
    ("“quoted” ﬁne", '"quoted" fine'),                             # ftfy uncurls quotes, splits ligatures
    ("色调艳丽，过曝", "色调艳丽,过曝"),                                  # ftfy folds full-width punctuation
])
def test_prompt_clean_cases(raw, expected):
    assert prompt_clean(raw) == expected


def test_prompt_clean_matches_diffusers_wan():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as wan_prompt_clean

    for text in ["  x &amp;amp; y ", "doesnâ€™t\n\nstop", ZH_NEG, "plain text"]:
        assert prompt_clean(text) == wan_prompt_clean(text)


# --------------------------------------------------------------------------- prompt tables

def test_system_prompts_and_negatives():
    assert renderer_system_prompt("t2v") == T2V_SYSTEM
    assert renderer_system_prompt("v2v") == V2V_SYSTEM
    assert renderer_system_prompt("no_such_task") == DEFAULT_SYSTEM
    assert renderer_system_prompt("_about") == DEFAULT_SYSTEM
    assert ZH_NEG.startswith("色调艳丽，过曝，静态") and ZH_NEG.endswith("倒着走")
    assert negative_prompt("english").startswith("vivid tones, overexposed, static")
    with pytest.raises(BerniniError, match="english"):
        negative_prompt("klingon")


# --------------------------------------------------------------------------- exact UMT5 strings

def test_t5_positive_text_bernini_r():
    # Bernini-R: system + prompt_clean(prompt); the system prompt is not cleaned.
    assert t5_positive_text("t2v", "  A cat &amp; a dog ") == T2V_SYSTEM + "A cat & a dog"
    assert t5_positive_text("v2v", "Make it snow.", "") == V2V_SYSTEM + "Make it snow."
    assert t5_positive_text("unknown", "x") == DEFAULT_SYSTEM + "x"
    assert t5_positive_text("t2i", "x", system_prompt="Custom  sys. ") == "Custom  sys. x"
    assert t5_positive_text("mv2v", "go") == (
        "You are a helpful assistant for editing. You might need to adjust the video's style, lighting, "
        "colors, textures, and the subject's pose or action.go")


def test_t5_positive_text_full_bernini():
    # Full Bernini: prompt_clean(prompt_clean(system + prompt_clean(prompt))).
    assert t5_positive_text("t2v", "  A cat &amp; a dog ", full_bernini=True) == T2V_SYSTEM + "A cat & a dog"
    assert t5_positive_text("t2i", "x", system_prompt="Custom  sys. ", full_bernini=True) == "Custom sys. x"
    assert t5_positive_text("t2i", "，x", system_prompt="系统，", full_bernini=True) == "系统,,x"
    assert t5_positive_text("t2i", "，x", system_prompt="系统，") == "系统，,x"


def test_t5_negative_text():
    assert t5_negative_text(ZH_NEG) == ZH_NEG                         # Bernini-R: verbatim
    assert t5_negative_text("  a  b ") == "  a  b "
    folded = t5_negative_text(ZH_NEG, full_bernini=True)              # full Bernini: cleaned twice
    assert folded == ZH_NEG.replace("，", ",")
    assert t5_negative_text("  a  b ", full_bernini=True) == "a b"


# --------------------------------------------------------------------------- encoding

def test_encode_lengths_and_rows(encoder):
    model, tok = encoder.model, encoder.tokenizer
    texts = ["a cat", "a dog dogs runs", ""]
    expected_ids = [[4, 5, 1], [4, 6, 6, 7, 8, 1], [1]]           # hand-tokenised, EOS appended
    embeds = encoder.encode(texts)
    assert [e.shape for e in embeds] == [torch.Size([len(i), 32]) for i in expected_ids]
    for text, ids, emb in zip(texts, expected_ids, embeds):
        padded = tok(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        assert padded.input_ids[0, : len(ids)].tolist() == ids
        with torch.no_grad():
            full = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).last_hidden_state
            alone = model(input_ids=torch.tensor([ids])).last_hidden_state
        assert torch.equal(emb, full[0, : len(ids)])
        # Masked padding must not leak: same rows as the unpadded sequence.
        err = (emb - alone[0]).abs().max() / alone.abs().max()
        assert err < 1e-5, err


def test_encode_truncates_to_512_with_eos(encoder):
    (emb,) = encoder.encode(["a " * 700])
    assert emb.shape == (512, 32)
    ids, mask = encoder.tokenize("a " * 700)
    assert ids[0, -1].item() == 1 and int(mask.sum()) == 512


def test_encode_rejects_bare_string(encoder):
    with pytest.raises(BerniniError, match="list"):
        encoder.encode("a cat")


def test_pad_context():
    a, b = torch.randn(3, 8), torch.randn(5, 8)
    out = pad_context([a, b])
    assert out.shape == (2, 512, 8)
    assert torch.equal(out[0, :3], a) and torch.equal(out[1, :5], b)
    assert out[0, 3:].abs().sum() == 0 and out[1, 5:].abs().sum() == 0
    long = torch.randn(600, 8, dtype=torch.bfloat16)
    out = pad_context([long, a.bfloat16()])
    assert out.shape == (2, 600, 8) and out.dtype == torch.bfloat16      # never truncated
    assert torch.equal(out[0], long) and out[1, 3:].abs().sum() == 0
    assert pad_context([a], min_rows=0).shape == (1, 3, 8)
    with pytest.raises(BerniniError):
        pad_context([])


def test_from_pretrained_roundtrip(tmp_path, encoder):
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert list((tmp_path / "text_encoder").glob("*.safetensors"))
    loaded = UMT5TextEncoder.from_pretrained(tmp_path / "text_encoder", dtype=torch.float32)
    assert loaded.module is loaded.model and not loaded.module.training
    for x, y in zip(loaded.encode(["a cat runs", ""]), encoder.encode(["a cat runs", ""])):
        assert torch.equal(x, y)
    bf16 = UMT5TextEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert {p.dtype for p in bf16.module.parameters()} == {torch.bfloat16}


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(BerniniError, match="does not exist"):
        UMT5TextEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(BerniniError, match="safetensors"):
        UMT5TextEncoder.from_pretrained(tmp_path / "text_encoder")
